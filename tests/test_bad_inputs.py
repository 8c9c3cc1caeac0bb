"""Generated bad inputs, hundreds of them, through the CLI in this process (typer's
CliRunner): configs, data files, tether files, prediction inputs, run directories, history
files and output paths. Every one must end with exit status 2, one `error:` line, no
traceback, and no new file anywhere.

Each input is bad by construction (a strategy never draws a valid one), so no case starts
a job. The examples per test add up to well over 200.
"""

import contextlib
import os
import tempfile
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.config import Config
from ensemble.runtime.job import run_local
from tests.conftest import TINY

CASES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real, finished run directory (in one process, a few seconds)."""
    from ensemble.config import load_config

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_local(load_config(None, [*TINY, "job=done", "models.count=2"]), run_dir)
    return run_dir


def files_under(*roots: Path) -> set[Path]:
    return {p for r in roots for p in r.rglob("*")}


@contextlib.contextmanager
def sandbox(*watched: Path):
    """A fresh working directory; afterwards, no file may have appeared in it or in the
    `watched` directories."""
    with tempfile.TemporaryDirectory() as d:
        here, old = Path(d), os.getcwd()
        before = files_under(here, *watched)
        os.chdir(here)
        try:
            yield here
        finally:
            os.chdir(old)
        new = files_under(here, *watched) - before
        assert not new, f"left behind: {sorted(map(str, new))}"


def assert_one_error_line(args: list[str]) -> None:
    result = runner.invoke(app, args)
    why = f"{args}: exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    assert result.exit_code == 2, why
    assert "Traceback" not in result.stdout + result.stderr, why
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), why
    assert result.exception is None or isinstance(result.exception, SystemExit), why


# ---------------------------------------------------------------------------- configs

FIELDS = set(Config.model_fields)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
bad_key = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
    lambda k: k not in FIELDS
)
bad_config = st.one_of(
    st.binary(min_size=1, max_size=200).map(lambda b: b"\xff" + b),  # never UTF-8
    st.builds(lambda k, v: yaml.safe_dump({k: v}).encode(), bad_key, text),  # unknown key
    st.builds(  # a known key, a value of the wrong type
        lambda v: yaml.safe_dump({"models": {"count": v}}).encode(),
        text.filter(lambda s: not s.strip().lstrip("+-").isdigit()),
    ),
    st.builds(lambda xs: yaml.safe_dump(xs).encode(), st.lists(st.integers(), min_size=1)),
    st.sampled_from([b"models: [\n", b"{{", b"train:\n  lr: -1\n", b"policy:\n  alpha: 7\n"]),
)


@CASES
@given(bad_config)
def test_bad_config_files(content):
    with sandbox() as here:
        (here / "bad.yaml").write_bytes(content)
        assert_one_error_line(["run", "bad.yaml", "--run-dir", "out"])
        (here / "bad.yaml").unlink()


@CASES
@given(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", bad_key, st.integers()),
        st.builds(lambda v: f"models.count={v}", st.sampled_from(["x", "-3", "0", "[1]", "1.5"])),
        st.builds(lambda v: f"train.lr={v}", st.sampled_from(["-1", "0", "fast", "[]"])),
        st.builds(
            lambda v: f"data.name={v}",
            st.text("abcxyz", min_size=1).filter(lambda s: s not in ("digits", "wine", "text")),
        ),
        st.sampled_from(["models.count", "models", "=3", "policy.alpha=2", "job=../x"]),
    )
)
def test_bad_set_overrides(override):
    with sandbox():
        assert_one_error_line(["run", "--set", override, "--run-dir", "out"])


# ---------------------------------------------------------------------------- data files


def text_data(tmp: Path, data: bytes, labels: bytes) -> list[str]:
    (tmp / "x.txt").write_bytes(data)
    (tmp / "y.txt").write_bytes(labels)
    keys = [
        "data.name=text",
        "data.samples=12",
        "data.features=2",
        "data.classes=2",
        "data.data_file=x.txt",
        "data.labels_file=y.txt",
    ]
    return [a for k in keys for a in ("--set", k)]


def run_on_text_data(data: bytes, labels: bytes) -> None:
    """`ensemble run` on these two text files: one error line, nothing left behind but
    the inputs, which go too."""
    with sandbox() as here:
        args = text_data(here, data, labels)
        assert_one_error_line(["run", *args, "--run-dir", "out"])
        for f in ("x.txt", "y.txt"):
            (here / f).unlink()


numbers = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=0, max_size=40)
bad_data = st.one_of(
    numbers.filter(lambda xs: len(xs) != 24).map(lambda xs: " ".join(map(str, xs)).encode()),
    st.binary(min_size=1, max_size=100).map(lambda b: b"\xff" + b),
    st.builds(
        lambda xs, t: " ".join([*map(str, xs[:23]), t]).encode(),
        st.lists(st.floats(0, 1), min_size=23, max_size=23),
        st.sampled_from(["nan", "inf", "x", "1,5", "--"]),
    ),
)


@CASES
@given(bad_data)
def test_bad_data_files(data):
    run_on_text_data(data, b" ".join([b"0", b"1"] * 6))


@CASES
@given(
    st.one_of(
        st.lists(st.integers(-3, 5), min_size=12, max_size=12)
        .filter(lambda ys: any(y not in (0, 1) for y in ys))
        .map(lambda ys: " ".join(map(str, ys)).encode()),
        st.lists(st.sampled_from(["0", "1"]), max_size=30)
        .filter(lambda ys: len(ys) != 12)
        .map(lambda ys: " ".join(ys).encode()),
        st.sampled_from([b"0.5 " * 12, b"\xff\xfe", b""]),
    )
)
def test_bad_label_files(labels):
    run_on_text_data(" ".join(["0.5"] * 24).encode(), labels)


@CASES
@given(bad_data)
def test_bad_peer_tether_files(content):
    with sandbox() as here:
        (here / "t.txt").write_bytes(content)
        args = ["--set", "compat.fn=cosine", "--set", "peers=[{name: p, layer: out, file: t.txt}]"]
        assert_one_error_line(["run", *args, "--run-dir", "out"])
        (here / "t.txt").unlink()


# ---------------------------------------------------------------------------- inputs


bad_array = st.one_of(
    hnp.arrays(hnp.unicode_string_dtypes(max_len=3), hnp.array_shapes(min_dims=1, max_dims=2)),
    hnp.arrays(np.complex64, st.tuples(st.integers(1, 4), st.just(64))),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=4, max_side=4)),
    hnp.arrays(
        np.float32, st.tuples(st.integers(1, 4), st.integers(1, 200).filter(lambda w: w != 64))
    ),
    st.builds(lambda n: np.full((n, 64), np.nan, np.float32), st.integers(1, 3)),
    st.just(np.zeros((0, 64), np.float32)),
)


@CASES
@given(bad_array)
def test_bad_prediction_inputs(finished, x):
    with sandbox(finished) as here:
        np.save(here / "x.npy", x)
        assert_one_error_line(["predict", str(finished), "--input", "x.npy", "--output", "y.csv"])
        (here / "x.npy").unlink()


@CASES
@given(st.binary(max_size=300), st.sampled_from([".npy", ".csv", ".txt", ".bin"]))
def test_garbled_prediction_files(finished, content, suffix):
    with sandbox(finished) as here:
        name = f"x{suffix}"
        (here / name).write_bytes(
            b"\x93NUMPY\xff" + content if suffix == ".npy" else b"\xff" + content
        )
        assert_one_error_line(["predict", str(finished), "--input", name, "--output", "y.csv"])
        (here / name).unlink()


# ------------------------------------------------------------- run dirs, histories, outputs

READERS = [
    ["history"],
    ["lineage", "--model", "0"],
    ["tethers", "--model", "0"],
    ["eval"],
    ["plot"],
    ["history", "--json"],
]


@CASES
@given(st.sampled_from(READERS), st.sampled_from(["missing", "file", "empty", "dangling"]))
def test_bad_run_directories(command, kind):
    with sandbox() as here:
        target = here / "run"
        if kind == "file":
            target.write_text("not a directory")
        elif kind == "empty":
            target.mkdir()
        elif kind == "dangling":
            target.symlink_to(here / "nowhere")
        assert_one_error_line([command[0], str(target), *command[1:]])
        if kind == "file" or kind == "dangling":
            target.unlink()
        elif kind == "empty":
            target.rmdir()


@CASES
@given(st.sampled_from(READERS[:3] + READERS[5:]), st.binary(max_size=4096))
def test_garbage_history_files(command, content):
    with sandbox() as here:
        (here / "run").mkdir()
        (here / "run" / "history.sqlite").write_bytes(b"\xff" + content)
        assert_one_error_line([command[0], str(here / "run"), *command[1:]])
        (here / "run" / "history.sqlite").unlink()
        (here / "run").rmdir()


@CASES
@given(
    st.sampled_from(["dir", "missing-parent", "proc"]),
    st.sampled_from(["predict", "tethers"]),
)
def test_bad_output_paths(finished, kind, command):
    np.save(finished.parent / "ok.npy", np.zeros((2, 64), np.float32))
    with sandbox(finished) as here:
        (here / "adir").mkdir()
        out = {"dir": "adir", "missing-parent": "no/such/dir/y.out", "proc": "/proc/y.out"}[kind]
        if command == "predict":
            args = [
                "predict",
                str(finished),
                "--input",
                str(finished.parent / "ok.npy"),
                "--output",
                out,
            ]
        else:
            args = ["tethers", str(finished), "--model", "0", "--out", out]
        assert_one_error_line(args)
        (here / "adir").rmdir()


@CASES
@given(st.sampled_from(["file", "nonempty", "dangling", "proc"]))
def test_bad_run_dir_for_a_new_job(kind):
    with sandbox() as here:
        target = here / "run"
        if kind == "file":
            target.write_text("x")
        elif kind == "nonempty":
            target.mkdir()
            (target / "keep.txt").write_text("mine")
        elif kind == "dangling":
            target.symlink_to(here / "nowhere")
        else:
            target = Path("/proc/ensemble-run")
        assert_one_error_line(["run", "--set", "models.count=2", "--run-dir", str(target)])
        if kind in ("file", "dangling"):
            target.unlink()
        elif kind == "nonempty":
            (target / "keep.txt").unlink()
            target.rmdir()


# ------------------------------------------------------- bounds: what a probe of the CLI found


def keys_of(model, kind, prefix=""):
    """Dotted config keys whose field is a plain `kind` (float, int), recursively."""
    from pydantic import BaseModel

    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += keys_of(ann, kind, f"{prefix}{name}.")
        elif ann is kind or (get_origin(ann) in (Union, UnionType) and kind in get_args(ann)):
            out.append(f"{prefix}{name}")
    return out


FLOAT_KEYS = keys_of(Config, float)
INT_KEYS = keys_of(Config, int)


@CASES
@given(st.sampled_from(FLOAT_KEYS), st.sampled_from([".inf", "-.inf", ".nan", "1e999"]))
def test_non_finite_values_in_every_float_key(key, value):
    with sandbox():
        assert_one_error_line(["run", "--set", f"{key}={value}", "--run-dir", "out"])


@CASES
@given(st.sampled_from(INT_KEYS), st.booleans())
def test_a_boolean_is_not_a_number_in_any_int_key(key, value):
    with sandbox():
        assert_one_error_line(["run", "--set", f"{key}={str(value).lower()}", "--run-dir", "out"])


def alias_bomb(levels: int, width: int) -> str:
    lines = ["a0: &a0 [x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@CASES
@given(
    st.one_of(
        # width**levels past the bound: 10**6 values from 300 bytes
        st.builds(alias_bomb, st.integers(6, 9), st.integers(10, 12)),
        st.builds(
            lambda n: "model:\n  options: {a: " + "[" * n + "]" * n + "}\n", st.integers(65, 5000)
        ),  # nested past the bound (3,000 overflowed the stack)
        st.builds(lambda n: "a: " + "{b: " * n + "1" + "}" * n + "\n", st.integers(65, 3000)),
    )
)
def test_yaml_that_would_exhaust_the_machine(content):
    with sandbox() as here:
        (here / "bomb.yaml").write_text(content)
        assert_one_error_line(["run", "bomb.yaml", "--run-dir", "out"])
        assert_one_error_line(
            ["run", "--set", f"model.options={{a: {content.splitlines()[-1]}}}", "--run-dir", "out"]
        )
        (here / "bomb.yaml").unlink()


@CASES
@given(
    st.one_of(
        st.builds(lambda s: f"seed={s}", st.sampled_from(["-5", "-1", str(2**32), str(10**23)])),
        st.builds(lambda n: f"model.layers=[{n}]", st.integers(2**20 + 1, 10**12)),
        st.builds(lambda n: f"model.layers=[{n}, {n}]", st.integers(2**17, 2**20)),
        st.builds(lambda n: f"data.classes={n}", st.integers(10_001, 10**15)),
    )
)
def test_sizes_past_what_the_machine_holds(override):
    with sandbox():
        assert_one_error_line(["run", "--set", override, "--run-dir", "out"])


def run_on_csv(text: str) -> None:
    with sandbox() as here:
        (here / "d.csv").write_text(text)
        assert_one_error_line(["run", "--set", "data.path=d.csv", "--run-dir", "out"])
        (here / "d.csv").unlink()


@CASES
@given(
    st.one_of(
        st.integers(10_000, 2**62),  # a class id past any classifier: 2^62 was a MemoryError
        st.floats(0.01, 1e6).filter(lambda v: not float(v).is_integer()),  # a measurement
    ),
    st.integers(0, 11),
)
def test_labels_that_are_not_a_small_set_of_classes(label, row):
    labels = [str(i % 2) for i in range(12)]
    labels[row] = repr(label)
    run_on_csv("f0,f1,label\n" + "".join(f"{i},{i % 3},{y}\n" for i, y in enumerate(labels)))


@CASES
@given(st.sampled_from(["1e39", "-1e308", "3.5e38"]), st.integers(0, 11))
def test_feature_values_past_float32(value, row):
    cells = [str(i) for i in range(12)]
    cells[row] = value
    run_on_csv("f0,label\n" + "".join(f"{c},{i % 2}\n" for i, c in enumerate(cells)))


def test_a_csv_with_a_duplicate_column():
    run_on_csv("f0,f0,label\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(12)))


def huge_header(path: Path, shape: tuple, dtype: str = "<f4") -> None:
    """A .npy whose header claims `shape`, followed by a few bytes only."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"shape": shape, "fortran_order": False, "descr": dtype}
        )
        f.write(b"\0" * 64)


npy_shapes = st.tuples(st.integers(10**6, 10**12), st.integers(64, 65))


@CASES
@given(
    st.one_of(
        npy_shapes.map(lambda s: ("header", s)),
        st.sampled_from([("complex", (12, 3)), ("empty", (12, 0))]),
    )
)
def test_bad_npy_training_arrays(case):
    kind, shape = case
    with sandbox() as here:
        if kind == "header":
            huge_header(here / "x.npy", shape)
        else:
            dtype = np.complex64 if kind == "complex" else np.float32
            np.save(here / "x.npy", np.ones(shape, dtype) * (1 + 1j if kind == "complex" else 1))
        np.save(here / "y.npy", np.arange(12) % 2)
        keys = ["data.x_path=x.npy", "data.y_path=y.npy"]
        assert_one_error_line(["run", *[a for k in keys for a in ("--set", k)], "--run-dir", "out"])
        (here / "x.npy").unlink()
        (here / "y.npy").unlink()


@CASES
@given(npy_shapes)
def test_prediction_inputs_whose_header_claims_too_much(finished, shape):
    with sandbox(finished) as here:
        huge_header(here / "x.npy", shape)
        assert_one_error_line(["predict", str(finished), "--input", "x.npy", "--output", "y.csv"])
        (here / "x.npy").unlink()


DAMAGE = [
    "UPDATE rounds SET models = '{not json'",
    "DELETE FROM rounds",
    "UPDATE instructions SET compat = 'x'",
    "UPDATE instructions SET rate = 'fast'",
    "UPDATE events SET detail = '[1, 2'",
    "UPDATE generations SET key = 'nowhere'",
]


@CASES
@given(
    st.sampled_from(DAMAGE),
    st.sampled_from(
        [
            ["history"],
            ["history", "--explain", "1"],
            ["history", "--kind", "rejected"],
            ["lineage", "--model", "0"],
            ["tethers", "--model", "0", "--out", "t.safetensors"],
            ["plot"],
        ]
    ),
)
def test_damaged_history_contents(finished, damage, command):
    import shutil
    import sqlite3

    with sandbox(finished) as here:
        shutil.copytree(finished, here / "run")
        with sqlite3.connect(here / "run" / "history.sqlite") as conn:
            conn.execute(damage)
        before = files_under(here)
        result = runner.invoke(app, [command[0], str(here / "run"), *command[1:]])
        out = result.stdout + result.stderr
        assert "Traceback" not in out and (
            result.exit_code == 0 or (result.exit_code == 2 and out.count("error: ") == 1)
        ), f"{damage} {command}: {result.exit_code} {out}\n{result.exception!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), out
        for p in files_under(here) - before:  # what a successful command wrote
            p.unlink() if p.is_file() else None
        shutil.rmtree(here / "run")
        for p in sorted(files_under(here), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()


def test_predict_with_models_that_do_not_match_the_config(finished):
    import shutil

    with sandbox(finished) as here:
        shutil.copytree(finished, here / "run")
        cfg = here / "run" / "config.yaml"
        tree = yaml.safe_load(cfg.read_text())
        tree["model"]["layers"] = [7]
        cfg.write_text(yaml.safe_dump(tree))
        np.save(here / "x.npy", np.zeros((2, 64), np.float32))
        assert_one_error_line(["predict", "run", "--input", "x.npy", "--output", "y.csv"])
        shutil.rmtree(here / "run")
        (here / "x.npy").unlink()


def test_predict_takes_the_csv_training_takes(finished):
    """A byte-order mark and a header row (with the label column) as spreadsheets write
    them: the same predictions as the bare numbers."""
    x = np.random.default_rng(0).random((3, 64)).astype(np.float32)
    with sandbox(finished) as here:
        np.save(here / "x.npy", x)
        header = ",".join([*(f"f{i}" for i in range(64)), "label"])
        rows = [",".join([*map(repr, map(float, r)), "0"]) for r in x]
        (here / "x.csv").write_bytes(("\ufeff" + "\n".join([header, *rows]) + "\n").encode())
        for name in ("x.npy", "x.csv"):
            result = runner.invoke(
                app, ["predict", str(finished), "--input", name, "--output", f"{name}.out"]
            )
            assert result.exit_code == 0, result.stderr
        assert (here / "x.npy.out").read_text() == (here / "x.csv.out").read_text()
        for f in ("x.npy", "x.csv", "x.npy.out", "x.csv.out"):
            (here / f).unlink()
