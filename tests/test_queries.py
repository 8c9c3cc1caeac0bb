"""History queries on a hand-built history with known answers: filters, formats, explain,
lineage, generations and retention, through the Python API and the CLI."""

import csv
import io
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from ensemble.api import History
from ensemble.errors import RunDirError
from ensemble.history import HistoryWriter, dropped_by_retention, parse_retention
from tests.conftest import cli
from tests.helpers import THRESHOLDS, record


def row(kind, i, j, layer, c, step, epoch=0, merges=0):
    return record(kind, i, j, layer, c, step, epoch, merges)


def both(kind, i, j, layer, c, step, merges=1):
    return [
        row(kind, i, j, layer, c, step, merges=merges),
        row(kind, j, i, layer, c, step, merges=merges),
    ]


@pytest.fixture
def run_dir(tmp_path):
    """Four models. Round 1: 0+1 merge on fc1, 2/3 drift on fc2. Round 2: 1+2 merge on fc1.
    Round 3: 3+2 merge on out. So model 3's ancestry: 2 (round 3) <- 1 (round 2) <- 0 (round 1).
    """
    w = HistoryWriter(tmp_path / "history.sqlite", "hand", "job: hand\n")
    ids = [0, 1, 2, 3]
    mat = [[1, 0.9, 0.5, 0.4], [0.9, 1, 0.6, 0.5], [0.5, 0.6, 1, 0.1], [0.4, 0.5, 0.1, 1]]
    rng = np.random.default_rng(0)
    for m in ids:
        w.generation(m, 0, None, 0, {"fc1": rng.random((3, 2), dtype=np.float32)})
    w.round(
        ids,
        {"fc1": (ids, mat)},
        both("merge", 0, 1, "fc1", 0.9, 10) + both("drift", 2, 3, "fc2", 0.1, 10),
        THRESHOLDS,
    )
    w.round(ids, {"fc1": (ids, mat)}, both("merge", 1, 2, "fc1", 0.85, 20, merges=2), THRESHOLDS)
    w.round(ids, {"out": (ids, mat)}, both("merge", 2, 3, "out", 0.95, 30, merges=3), THRESHOLDS)
    for g in (1, 2, 3):
        w.generation(3, g, g, g * 10, {"fc1": np.full((3, 2), g, dtype=np.float32)})
    w.publication(0, 10, 0, 1.0, 0.5)
    w.event("started", 0, 0, node="n1")
    w.close()
    return tmp_path


def test_filters(run_dir):
    h = History.open(run_dir)
    assert [(d.model, d.partner, d.kind) for d in h.decisions()] == [
        (0, 1, "merge"),
        (2, 3, "drift"),
        (1, 2, "merge"),
        (2, 3, "merge"),
    ]
    assert [d.kind for d in h.decisions(kind="drift")] == ["drift"]
    assert [(d.model, d.partner) for d in h.merges(model=2)] == [(1, 2), (2, 3)]
    assert [d.layer for d in h.decisions(layer="fc1")] == ["fc1", "fc1"]
    assert [d.step for d in h.decisions(since_step=20)] == [20, 30]
    assert len(h.decisions(limit=2)) == 2
    assert [d.model for d in h.decisions(model=3, pairs=False)] == [3, 3]
    arr = h.decisions_array(kind="merge")
    assert arr.dtype.names[:3] == ("id", "round", "kind") and list(arr["step"]) == [10, 20, 30]
    with pytest.raises(ValueError, match="kind 'bogus'"):
        h.decisions(kind="bogus")


def test_explain_shows_the_inputs(run_dir):
    h = History.open(run_dir)
    d = h.merges(model=3)[0]
    x = h.explain(d.id)
    assert x.decision == d and x.round_models == [0, 1, 2, 3]
    assert x.compat_row == {0: 0.5, 1: 0.6, 3: 0.1}  # model 2's row of round 3's matrix
    assert x.merges_before == 2
    with pytest.raises(RunDirError, match="no instruction with id 999"):
        h.explain(999)


def test_lineage_follows_merges_back_in_time(run_dir):
    lin = History.open(run_dir).lineage(3)
    # (receiver, giver, round): 3 took 2's at round 3, 2 took 1's at 2, 1 took 0's at 1
    assert [(e.model, e.partner, e.round) for e in lin.edges] == [(1, 0, 1), (2, 1, 2), (3, 2, 3)]
    assert lin.ancestors() == {0, 1, 2}
    # model 1's own merge with 2 came after 0 and 1 merged, so 0 is 1's ancestor too
    assert History.open(run_dir).lineage(1).ancestors() == {0, 2}
    # model 0 merged only in round 1, with 1, which had no earlier merges
    assert [(e.model, e.partner) for e in History.open(run_dir).lineage(0).edges] == [(0, 1)]


def test_generation_export_round_trip(run_dir):
    h = History.open(run_dir)
    assert [g.generation for g in h.generations(3)] == [0, 1, 2, 3]
    t2 = h.tethers(3, 2)
    np.testing.assert_array_equal(t2["fc1"], np.full((3, 2), 2, dtype=np.float32))
    np.testing.assert_array_equal(h.tethers(3)["fc1"], np.full((3, 2), 3, dtype=np.float32))
    with pytest.raises(RunDirError, match="model 3 has no generation 9; it has 0..3"):
        h.tethers(3, 9)
    with pytest.raises(RunDirError, match="no tether generations for model 7"):
        h.tethers(7)


@pytest.mark.parametrize(
    "spec, kept",
    [
        ("all", [0, 1, 2, 3, 4, 5, 6]),
        ("every:3", [0, 3, 6]),
        ("every:2", [0, 2, 4, 6]),
        ("last:2", [5, 6]),
    ],
)
def test_retention(tmp_path, spec, kept):
    w = HistoryWriter(tmp_path / "history.sqlite", "r", "", retention=spec)
    for g in range(7):
        w.generation(0, g, g or None, g, {"fc1": np.full((2, 2), g, dtype=np.float32)})
    w.close()
    h = History.open(tmp_path)
    assert [g.generation for g in h.generations(0) if g.path] == kept
    files = sorted(p.name for p in (tmp_path / "generations").iterdir())
    names = [f"round_{g:06d}" if g else "model_0_gen_000000" for g in kept]
    assert files == sorted(f"{n}.safetensors" for n in names)
    dropped = sorted(set(range(7)) - set(kept))
    if dropped:
        with pytest.raises(RunDirError, match=f"generation {dropped[0]} of model 0 was not kept"):
            h.tethers(0, dropped[0])
    for g in kept:
        assert h.tethers(0, g)["fc1"][0, 0] == g


def test_a_round_file_holds_every_model_it_changed_and_goes_with_the_last(tmp_path):
    """Generations of one round share a file; retention deletes it only once none of the
    generations in it is kept."""
    w = HistoryWriter(tmp_path / "history.sqlite", "r", "", retention="last:1")
    t = {"fc1": np.zeros((2, 2), dtype=np.float32)}
    w.generations([(0, 0, None, 0, t), (1, 0, None, 0, t)])
    w.generations([(0, 1, 1, 5, {"fc1": t["fc1"] + 1})])  # model 1 keeps generation 0
    assert (tmp_path / "generations" / "model_0_gen_000000.safetensors").exists()
    w.generations([(1, 1, 2, 6, {"fc1": t["fc1"] + 2})])  # now no one keeps the first file
    w.close()
    files = sorted(p.name for p in (tmp_path / "generations").iterdir())
    assert files == ["round_000001.safetensors", "round_000002.safetensors"]
    h = History.open(tmp_path)
    assert h.tethers(0)["fc1"][0, 0] == 1 and h.tethers(1)["fc1"][0, 0] == 2


def test_identical_tethers_in_a_round_are_stored_once(tmp_path):
    """A FedAvg round leaves every model with the same tethers: the round's file holds
    them once, and every model still reads its own generation back."""
    from safetensors import safe_open

    w = HistoryWriter(tmp_path / "history.sqlite", "r", "")
    mean = {"fc1": np.full((2, 2), 0.5, dtype=np.float32), "out": np.ones(3, dtype=np.float32)}
    other = {"fc1": np.full((2, 2), 0.7, dtype=np.float32), "out": np.ones(3, dtype=np.float32)}
    w.generations([(m, 1, 1, 10, other if m == 2 else mean) for m in range(4)])
    w.close()
    with safe_open(str(tmp_path / "generations" / "round_000001.safetensors"), "numpy") as f:
        assert sorted(f.keys()) == ["model_0/fc1", "model_0/out", "model_2/fc1", "model_2/out"]
    h = History.open(tmp_path)
    for m in range(4):
        got = h.tethers(m, 1)
        assert set(got) == {"fc1", "out"}
        assert got["fc1"][0, 0] == np.float32(0.7 if m == 2 else 0.5)


def test_retention_spec_errors():
    assert parse_retention("every:4") == ("every", 4)
    assert dropped_by_retention("last", 3, 2) is None
    for bad in ("every", "last:0", "some:3", "every:x"):
        with pytest.raises(ValueError, match="expected 'all', 'every:K' or 'last:N'"):
            parse_retention(bad)


def test_cli_formats_and_filters(run_dir):
    as_json = json.loads(
        cli("history", str(run_dir), "--format", "json", "--kind", "merge", "--model", "2").stdout
    )
    assert [(d["model"], d["partner"]) for d in as_json] == [(1, 2), (2, 3)]
    rows = list(
        csv.DictReader(
            io.StringIO(cli("history", str(run_dir), "--format", "csv", "--layer", "fc2").stdout)
        )
    )
    assert [(r["kind"], r["model"], r["partner"]) for r in rows] == [("drift", "2", "3")]
    out = cli("history", str(run_dir), "--since-step", "20", "--limit", "1").stdout
    assert "1 decisions" in out and "1 & 2" in out
    explained = json.loads(cli("history", str(run_dir), "--explain", "1", "--json").stdout)
    assert explained["decision"]["id"] == 1 and explained["compat_row"]["1"] == 0.9
    tree = cli("lineage", str(run_dir), "--model", "3").stdout
    assert "model 2 at round 3" in tree and "model 1 at round 2" in tree and "model 0" in tree


def test_cli_tethers_export(run_dir, tmp_path):
    out = tmp_path / "t.safetensors"
    proc = cli("tethers", str(run_dir), "--model", "3", "--generation", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(load_file(str(out))["fc1"], np.ones((3, 2), dtype=np.float32))
    listing = cli("tethers", str(run_dir), "--model", "3").stdout
    assert "4 tether generations" in listing


def test_cli_query_errors(run_dir, tmp_path):
    for args, msg in [
        (
            ("history", str(run_dir), "--kind", "both"),
            "--kind: expected 'merge', 'drift' or 'rejected'",
        ),
        (("history", str(run_dir), "--explain", "77"), "no instruction with id 77"),
        (("tethers", str(run_dir), "--model", "3", "--generation", "8"), "no generation 8"),
        (("lineage", str(tmp_path / "nope"), "--model", "1"), "run directory does not exist"),
        (("status",), "no cluster given"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert msg in " ".join(proc.stderr.split()), (args, proc.stderr)


def test_plots_of_a_large_population_sample_its_models(tmp_path):
    """300 models: per-model pictures draw an even sample of 16, the compat heatmap every
    2nd model (at most 256 a side), the curves a band; every picture is still made."""
    import matplotlib.image as mpimg

    from ensemble.outputs.plots import MAX_LINES, plot_all, sample

    assert sample(list(range(10))) == list(range(10))
    picked = sample(list(range(300)))
    assert len(picked) == MAX_LINES and picked[0] == 0 and picked[-1] == 299

    m = 300
    rng = np.random.default_rng(0)
    w = HistoryWriter(tmp_path / "history.sqlite", "big", "")
    w.publications([(i, 10, 0, 1.0, 1.0, None, None, None, None) for i in range(m)])
    t = {i: {"fc1": rng.normal(1, 0.1, (3, 2)).astype(np.float32)} for i in range(m)}
    w.generations([(i, 0, None, 0, t[i]) for i in range(m)])
    c = rng.normal(size=(m, m))
    rows = [both("merge", i, i + 1, "fc1", 1.5, 10) for i in range(0, m, 2)]
    rid = w.round(list(range(m)), {"fc1": (list(range(m)), (c + c.T) / 2)}, sum(rows, []))
    w.generations([(i, 1, rid, 10, {"fc1": t[i]["fc1"] + 0.1}) for i in range(m)])
    for i in range(m):
        for split in ("train", "val"):
            w.metrics(i, 0, split, 1.0 + i / m, 0.5)
            w.metrics(i, 1, split, 0.5 + i / m, 0.8)
    w.close()
    made = plot_all(History.open(tmp_path), tmp_path / "plots")
    names = {p.name for p in made}
    assert {"compat_fc1.png", "orbits.png", "lineage.png", "curves.png"} <= names
    for p in made:
        assert mpimg.imread(p).shape[0] > 100  # a real picture, not an empty file
