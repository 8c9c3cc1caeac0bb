"""Your own data: CSV, Parquet, NumPy files and a data factory; every bad file names the
file, the row or column, and what was expected."""

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_wine
from typer.testing import CliRunner

from ensemble import Job
from ensemble.cli import app
from ensemble.config import load_config
from ensemble.data.datasets import load_dataset
from ensemble.errors import ConfigError, DataError
from tests.conftest import tiny

NAMES = ["barolo", "grignolino", "barbera"]
runner = CliRunner()


@pytest.fixture(scope="module")
def wine():
    d = load_wine()
    return d.data, d.target


def write_csv(path, x, y, header=None, label="label"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header or [*(f"f{i}" for i in range(x.shape[1])), label])
        for row, c in zip(x, y, strict=True):
            w.writerow([*row, c])
    return path


def load(*overrides):
    return load_dataset(load_config(None, list(overrides)).data, 0)


def test_csv_with_class_names_is_read_split_and_standardised(tmp_path, wine):
    x, y = wine
    path = write_csv(tmp_path / "wine.csv", x, [NAMES[c] for c in y])
    d = load(f"data.path={path}")  # the name csv follows from the file
    assert d.name == "csv" and d.features == 13 and d.classes == 3
    assert d.class_names == sorted(NAMES)
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == len(y)
    np.testing.assert_allclose(d.x_train.mean(0), 0, atol=1e-5)  # standardised on train
    raw = load(f"data.path={path}", "data.standardize=false")
    assert raw.mean is None and raw.x_train.max() > 100  # proline, as given


def test_parquet_npy_and_factory_give_the_same_split(tmp_path, wine):
    x, y = wine
    table = pa.table({**{f"f{i}": x[:, i] for i in range(13)}, "target": y})
    pq.write_table(table, tmp_path / "wine.parquet")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "wine_data.py").write_text(
        "from sklearn.datasets import load_wine\n"
        "import torch\n"
        "def arrays(scale=1.0):\n    d = load_wine()\n    return d.data * scale, d.target\n"
        "def dataset():\n    d = load_wine()\n"
        "    return torch.utils.data.TensorDataset(torch.tensor(d.data), torch.tensor(d.target))\n"
    )
    got = [
        load(f"data.path={tmp_path / 'wine.parquet'}", "data.label_column=target"),
        load(f"data.x_path={tmp_path / 'x.npy'}", f"data.y_path={tmp_path / 'y.npy'}"),
        load(f"data.factory={tmp_path / 'wine_data.py'}:arrays", "data.options={scale: 1.0}"),
        load(f"data.factory={tmp_path / 'wine_data.py'}:dataset"),
    ]
    assert [d.name for d in got] == ["parquet", "npy", "factory", "factory"]
    for d in got[1:]:
        np.testing.assert_allclose(d.x_test, got[0].x_test, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(d.y_test, got[0].y_test)
    assert got[0].class_names is None  # integer labels stay themselves


def test_a_job_trains_on_a_csv_and_predicts_class_names(tmp_path, wine):
    x, y = wine
    path = write_csv(tmp_path / "wine.csv", x, [NAMES[c] for c in y])
    run = tmp_path / "run"
    cfg = load_config(
        None,
        tiny(
            "job=csv",
            f"data.path={path}",
            "policy.name=none",
            "train.epochs=15",
            "train.batch_size=16",
        ),
    )
    result = Job(cfg, run_dir=run).run(local=True)
    assert result.summary["ensemble"]["accuracy"] > 0.8
    inputs = tmp_path / "new.npy"
    np.save(inputs, x[:5])
    out = tmp_path / "pred.csv"
    res = runner.invoke(app, ["predict", str(run), "--input", str(inputs), "--output", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [r["name"] for r in rows] == [sorted(NAMES)[int(r["label"])] for r in rows]
    assert sum(r["name"] == NAMES[c] for r, c in zip(rows, y[:5], strict=True)) >= 4


def test_job_api_takes_a_dict_and_overrides(tmp_path):
    from ensemble.api import Job as J

    job = J({"models": {"count": 2}}, ["train.epochs=1"], run_dir=tmp_path / "r")
    assert (job.cfg.models.count, job.cfg.train.epochs) == (2, 1)
    with pytest.raises(ConfigError, match="models.count"):
        J({"models": {"count": "many"}})


BAD_CSV = [
    ("f0,f1\n1,2\n3,4\n", "no label column 'label'"),
    ("f0,label\n1,0\nabc,1\n2,0\n", "row 2, column 'f0' is 'abc'; expected a number"),
    ("f0,f1,label\n1,2,0\n3,4\n5,6,1\n", "(line 3): not a valid CSV table"),
    ("f0,label\n1,0\n,1\n2,1\n", "row 2, column 'f0' is empty, NaN or infinite"),
    ("f0,label\n1,0\nnan,1\n2,1\n", "row 2, column 'f0' is empty, NaN or infinite"),
    ("f0,label\n1,a\n2,a\n3,a\n", "every sample is class 'a'; expected at least 2 classes"),
    ("f0,label\n1,0\n2,\n3,1\n", "row 2, label is empty or NaN"),
    ("label\n1\n0\n", "only the label column"),
    ("f0,label\n", "no rows"),
]


@pytest.mark.parametrize("text, message", BAD_CSV)
def test_a_bad_csv_names_the_file_the_row_and_what_was_expected(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        load(f"data.path={path}")
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_bad_arrays_and_factories(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((5, 3)))
    np.save(tmp_path / "y4.npy", np.array([0, 1, 0, 1]))
    np.save(tmp_path / "xs.npy", np.array(["a", "b"]))
    x = tmp_path / "x.npy"
    with pytest.raises(DataError, match=r"y4.npy: shape \(4,\); expected \(5,\)"):
        load(f"data.x_path={x}", f"data.y_path={tmp_path / 'y4.npy'}")
    with pytest.raises(DataError, match="xs.npy: shape"):
        load(f"data.x_path={tmp_path / 'xs.npy'}", f"data.y_path={tmp_path / 'y4.npy'}")
    (tmp_path / "txt.npy").write_text("not numpy")
    with pytest.raises(DataError, match="txt.npy: not a NumPy .npy array"):
        load(f"data.x_path={tmp_path / 'txt.npy'}", f"data.y_path={tmp_path / 'y4.npy'}")
    with pytest.raises(DataError, match=r"missing.csv \(data.path\): file not found"):
        load(f"data.path={tmp_path / 'missing.csv'}")
    with pytest.raises(ConfigError, match="data.name npy: set data.y_path"):
        load_config(None, [f"data.x_path={x}"])
    (tmp_path / "fac.py").write_text("def f():\n    return 7\n")
    with pytest.raises(DataError, match="returned int; expected"):
        load(f"data.factory={tmp_path / 'fac.py'}:f")
    (tmp_path / "fac2.py").write_text(
        "import numpy as np\ndef f():\n    return np.ones((4, 2)), np.zeros(4)\n"
    )
    with pytest.raises(DataError, match="every sample is class '0'"):
        load(f"data.factory={tmp_path / 'fac2.py'}:f")


def test_a_member_column_deals_each_client_to_one_member(tmp_path, wine):
    """data.member_column: each distinct value is a client, clients are dealt to members in
    turn, each member trains, validates and is tested on its own clients' rows only, and
    the column is not a feature."""
    x, y = wine
    sites = np.array([f"site-{i % 6}" for i in range(len(y))])
    path = tmp_path / "sites.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"f{i}" for i in range(13)), "site", "label"])
        for row, s, c in zip(x, sites, y, strict=True):
            w.writerow([*row, s, c])
    over = ["job=sites", f"data.path={path}", "data.member_column=site", "models.count=3"]
    over += ["policy.name=none", "train.epochs=10", "train.batch_size=16"]
    cfg = load_config(None, tiny(*over))
    assert cfg.data.partition == "column"
    from ensemble.runtime.job import prepare

    prep = prepare(cfg)
    assert prep.data.features == 13  # the site is not a feature
    assert prep.parts.clients == [["site-0", "site-3"], ["site-1", "site-4"], ["site-2", "site-5"]]
    names = prep.data.client_names
    for m, mine in enumerate(prep.parts.clients):
        for split, rows in enumerate((prep.parts.train[m], prep.parts.val[m], prep.parts.test[m])):
            held = {names[c] for c in prep.data.clients[split][rows]}
            assert held <= set(mine) and len(rows) > 0
    total = sum(len(r) for r in prep.parts.train)
    assert total == len(prep.data.y_train)  # every training row belongs to one member
    result = Job(cfg, run_dir=tmp_path / "run").run(local=True)
    s = result.summary
    assert [m["clients"] for m in s["members"]] == prep.parts.clients
    assert s["personal"]["accuracy"] > 0.8 and s["differ"] is True


def test_a_member_column_with_too_few_clients_is_a_clear_error(tmp_path, wine):
    x, y = wine
    path = tmp_path / "two.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"f{i}" for i in range(13)), "site", "label"])
        for i, (row, c) in enumerate(zip(x, y, strict=True)):
            w.writerow([*row, i % 2, c])
    from ensemble.runtime.job import prepare

    cfg = load_config(None, tiny("job=few", f"data.path={path}", "data.member_column=site"))
    with pytest.raises(
        DataError,
        match=r"data.member_column 'site': 2 distinct clients, fewer "
        r"than the 4 members \(models.count\)",
    ):
        prepare(cfg)
    with pytest.raises(DataError, match=r"no member column 'place' \(data.member_column\)"):
        prepare(load_config(None, tiny("job=few", f"data.path={path}", "data.member_column=place")))
    with pytest.raises(ConfigError, match="data.member_column splits the rows by client"):
        load_config(None, [f"data.path={path}", "data.member_column=site", "data.partition=shard"])
