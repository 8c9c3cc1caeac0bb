"""The `ensemble` command end to end, as a user runs it, plus its bad-input paths."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ensemble.history import HistoryReader
from tests.conftest import cli

ENSEMBLE = [sys.executable, "-m", "ensemble.cli"]


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    text = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert text.startswith("error:"), proc.stderr
    for f in fragments:
        assert f in text, (f, proc.stderr)


@pytest.mark.ray
def test_run_then_history(tmp_path, tiny_overrides):
    run_dir = tmp_path / "job"
    sets = [a for o in tiny_overrides + ["job=cli-e2e"] for a in ("--set", o)]
    proc = cli("run", *sets, "--run-dir", str(run_dir), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ensemble" in proc.stdout and "merges" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["job"] == "cli-e2e"

    proc = cli("history", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    recorded = HistoryReader(run_dir / "history.sqlite").decisions()
    assert [{k: v for k, v in r.items() if k != "outcome"} for r in listed] == [
        d.as_dict() for d in recorded
    ]
    assert {r["outcome"] for r in listed if r["kind"] == "merge"} <= {"kept"}  # no guard here
    # counted per instruction: once for each model a decision changed
    instructions = HistoryReader(run_dir / "history.sqlite").decisions(pairs=False)
    assert len(instructions) == summary["merges_attempted"] + summary["drifts"]

    table = cli("history", str(run_dir))
    assert table.returncode == 0 and f"{len(listed)} decisions" in table.stdout

    again = cli("run", *sets, "--run-dir", str(run_dir), "--quiet")
    assert_clean_error(again, str(run_dir), "already holds job 'cli-e2e'")
    assert json.loads((run_dir / "summary.json").read_text()) == summary  # untouched


def test_bad_config_is_one_clean_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  name: greedy\n")
    assert_clean_error(
        cli("run", str(bad), "--run-dir", str(tmp_path / "r")), "policy.name: unknown name 'greedy'"
    )
    assert not (tmp_path / "r").exists()


def test_bad_set_key(tmp_path):
    assert_clean_error(
        cli("run", "--set", "train.epoch=3", "--run-dir", str(tmp_path / "r")),
        "--set train.epoch",
        "no key 'epoch'",
    )
    assert not (tmp_path / "r").exists()


def test_bad_data_file_leaves_no_run_dir(tmp_path):
    (tmp_path / "d.txt").write_text("1 2 oops")
    (tmp_path / "l.txt").write_text("0 1 2")
    proc = cli(
        "run",
        "--set",
        "data.name=text",
        "--set",
        f"data.data_file={tmp_path}/d.txt",
        "--set",
        f"data.labels_file={tmp_path}/l.txt",
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert_clean_error(proc, "d.txt: data value #3 is 'oops', not a number")
    assert not (tmp_path / "r").exists()


def test_history_of_missing_or_non_run_dir(tmp_path):
    assert_clean_error(cli("history", str(tmp_path / "nope")), "run directory does not exist")
    assert_clean_error(cli("history", str(tmp_path)), "not a run directory")
    (tmp_path / "history.sqlite").write_text("not sqlite at all")
    assert_clean_error(cli("history", str(tmp_path)), "not a history database")


def test_help_lists_commands():
    proc = cli("--help")
    assert proc.returncode == 0 and "run" in proc.stdout and "history" in proc.stdout


@pytest.mark.ray
def test_ctrl_c_stops_cleanly_and_keeps_history(tmp_path, tiny_overrides):
    import signal
    import sqlite3
    import time

    run_dir = tmp_path / "job"
    sets = [a for o in tiny_overrides + ["train.epochs=400"] for a in ("--set", o)]
    proc = subprocess.Popen(
        [*ENSEMBLE, "run", *sets, "--run-dir", str(run_dir), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen, deadline = 0, time.time() + 180
    while seen < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if (run_dir / "history.sqlite").exists():
            try:
                seen = HistoryReader(run_dir / "history.sqlite").count("publications")
            except (sqlite3.Error, ValueError):
                pass  # schema not written yet
    assert seen >= 5, proc.stderr.read() if proc.poll() is not None else "no publications"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (run_dir / "summary.json").exists()  # not mistaken for a finished run
    h = HistoryReader(run_dir / "history.sqlite")
    assert h.count("publications") >= seen


def test_tables_summarise_thousands_of_models():
    """A 4,096-model job's summary shows the best and the worst members, not 4,096 rows;
    its progress display one line for the population."""
    from rich.console import Console

    from ensemble.cli.run import MAX_ROWS, progress_table, summary_table

    n = 4096
    members = [{"model": i, "accuracy": i / n, "nll": 1 - i / n, "steps": 9} for i in range(n)]
    s = {
        "job": "big",
        "models": n,
        "data": "digits",
        "test_samples": 360,
        "members": members,
        "mean_member": {"accuracy": 0.5, "nll": 0.5},
        "ensemble": {"accuracy": 0.9, "nll": 0.3},
        "merges": 0,
        "merges_attempted": 0,
        "drifts": 0,
        "rounds": 0,
        "wall_seconds": 1.0,
    }
    t = summary_table(s)
    assert t.row_count == MAX_ROWS + 1 + 2
    con = Console(width=120, record=True)
    con.print(t)
    text = con.export_text()
    assert f"… {n - MAX_ROWS} more" in text and "4095" in text and "\n│ 0 " not in text
    p = {
        "rounds": 1,
        "merges_kept": 0,
        "merges": 0,
        "drifts": 0,
        "publications": 5,
        "models": [
            {
                "model": i,
                "epoch": i % 2,
                "step": 10 + i % 3,
                "loss": 1.0,
                "val_acc": 0.5,
                "active": i % 4 != 0,
            }
            for i in range(n)
        ],
    }
    t = progress_table(p, epochs=3)
    assert t.row_count == 1
    con.print(t)
    text = con.export_text()
    assert "all 4096" in text and "3072 running" in text


# A factory whose members blow up from their first step when their own initial weight
# a.weight[0, 0] is positive (elementwise, so it works on a stack of members too).
SOME_BLOW_UP = """\
import torch

class Net(torch.nn.Module):
    def __init__(self, features, classes):
        super().__init__()
        self.a, self.b = torch.nn.Linear(features, 8), torch.nn.Linear(8, classes)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y * torch.where(self.a.weight[0, 0] > 0, float("nan"), 1.0)  # no NaN grads

def make(features, classes):
    return Net(features, classes)
"""


@pytest.mark.ray
def test_a_member_that_dies_is_named_in_the_table_and_the_summary_and_exits_3(
    tmp_path, tiny_overrides
):
    from ensemble.config import load_config
    from ensemble.training.model import build_member

    code = tmp_path / "net.py"
    code.write_text(SOME_BLOW_UP)
    keys = [*tiny_overrides, f"model.factory={code}:make", "faults.on_poison=stop", "job=dies"]
    cfg = load_config(None, keys)
    doomed = [m for m in range(4) if build_member(cfg, 64, 10, m)[0].a.weight[0, 0] > 0]
    assert 0 < len(doomed) < 4, "pick another seed: the test needs some of each"
    run_dir = tmp_path / "run"
    proc = cli("run", *[a for k in keys for a in ("--set", k)], "--run-dir", str(run_dir))
    assert proc.returncode == 3, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [f["model"] for f in summary["failed"]] == doomed
    assert all("loss is nan" in f["reason"] for f in summary["failed"])
    assert [m["model"] for m in summary["members"]] == [m for m in range(4) if m not in doomed]
    for m in doomed:  # a line of the table each
        assert f"{m} failed" in proc.stdout and "quarantined (loss is nan)" in proc.stdout
    assert f"{len(doomed)} of 4 members failed" in " ".join(proc.stderr.split())


def test_ctrl_c_in_a_factory_that_hangs_names_nothing_that_does_not_exist(tmp_path):
    code, entered = tmp_path / "slow.py", tmp_path / "entered"
    code.write_text(
        "import pathlib, time\n\ndef make(features, classes):\n"
        f"    pathlib.Path({str(entered)!r}).touch()\n    time.sleep(300)\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [*ENSEMBLE, "run", "--set", f"model.factory={code}:make", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not entered.exists() and time.time() < deadline:  # stuck in the factory now
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted before anything was recorded" in err and "history.sqlite" not in err
    assert not run_dir.exists()


PRINTS = """\
import torch

def make(features, classes):
    print("hello from the factory", flush=True)
    return torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.Linear(8, classes))
"""


@pytest.mark.ray
def test_quiet_prints_the_summary_only_and_ctrl_c_pressed_often_exits_130(tmp_path, tiny_overrides):
    code = tmp_path / "loud.py"
    code.write_text(PRINTS)
    keys = [*tiny_overrides, f"model.factory={code}:make"]
    sets = [a for k in keys for a in ("--set", k)]
    quiet = cli("run", *sets, "--set", "job=quiet", "--run-dir", str(tmp_path / "q"), "--quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "hello" not in quiet.stdout + quiet.stderr  # workers' output: driver.log only
    assert "hello from the factory" in (tmp_path / "q" / "driver.log").read_text()
    assert quiet.stdout.splitlines()[-1].startswith("run directory:")

    run_dir = tmp_path / "r"
    proc = subprocess.Popen(
        [*ENSEMBLE, "run", *sets, "--set", "train.epochs=400", "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints").is_dir() and time.time() < deadline:
        time.sleep(0.3)
    for _ in range(4):  # the first stops the job; the others land while it stops
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; what was recorded is in" in err and "Traceback" not in err


def test_the_drivers_log_has_no_name_a_kill_could_leave_behind(tmp_path, monkeypatch):
    import tempfile

    from ensemble.cli.run import ray_log

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("job: j\n")
    with ray_log(run, "j"):
        os.write(2, b"a line of Ray's\n")
        assert list((tmp_path / "tmp").iterdir()) == []  # nothing named, even now
    assert (run / "driver.log").read_text() == "a line of Ray's\n"
