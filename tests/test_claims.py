"""A run directory has one owner: its claim, what a failed start or resume removes (only
what it created), and what --resume may change."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from ensemble.api import History
from ensemble.config import load_config
from ensemble.errors import RunDirError
from ensemble.runtime.job import run_local
from ensemble.runtime.rundir import LOCK, claim_for_resume, claim_run_dir
from tests.conftest import TINY, cli
from tests.test_cli import assert_clean_error


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root and a hash of its bytes (run.lock's text only says who held
    the claim last)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


@pytest.fixture
def interrupted(tmp_path):
    """A run directory as an interrupted job leaves it: a history and config, no summary."""
    run_dir = tmp_path / "run"
    run_local(load_config(None, [*TINY, "job=cut", "models.count=2"]), run_dir)
    (run_dir / "summary.json").unlink()
    return run_dir


def test_claims_made_at_the_same_moment_give_one_owner(tmp_path):
    target, barrier = tmp_path / "runs" / "same", threading.Barrier(8)
    won, refused = [], []

    def claim(i):
        barrier.wait()
        try:
            won.append(claim_run_dir(target, f"job{i}"))
        except RunDirError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, refused
    assert all("in use by a job that is still running" in r for r in refused), refused
    holder = (target / LOCK).read_text()
    won[0].release()
    assert f"pid {os.getpid()}" in holder and "job" in holder


def test_a_claim_whose_holder_was_killed_is_stale_and_taken(tmp_path):
    target = tmp_path / "run"
    code = (
        "import sys, time; from ensemble.runtime.rundir import claim_run_dir; "
        f"c = claim_run_dir({str(target)!r}, 'first'); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match="in use by a job that is still running"):
            claim_run_dir(target, "second")
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops its lock with it
        holder.wait()
    claim = claim_run_dir(target, "second")  # the stale claim: nothing to wait for
    claim.release()


def test_a_failed_start_in_a_directory_it_found_removes_only_what_it_made(tmp_path):
    target = tmp_path / "given"
    target.mkdir()
    claim = claim_run_dir(target, "j")
    (target / "config.yaml").write_text("job: j\n")
    (target / "generations").mkdir()
    claim.undo()
    claim.release()
    assert target.is_dir() and list(target.iterdir()) == []  # the user's directory stays


def test_a_failed_start_never_empties_a_resumed_run(interrupted):
    before = snapshot(interrupted)
    cfg = load_config(interrupted / "config.yaml", saved=True)
    claim = claim_for_resume(interrupted, cfg)
    claim.undo()  # what the driver does when a start fails
    claim.release()
    assert snapshot(interrupted) == before


def test_a_resume_that_cannot_start_deletes_nothing(interrupted):
    before = snapshot(interrupted)
    proc = cli("run", "--resume", str(interrupted), "--address", "127.0.0.1:9")
    assert_clean_error(proc, "cannot reach a Ray cluster at 127.0.0.1:9")
    after = snapshot(interrupted)
    assert {k: v for k, v in after.items() if k != "driver.log"} == before


def test_a_resume_of_a_running_job_is_refused_at_once(interrupted):
    before = snapshot(interrupted)
    cfg = load_config(interrupted / "config.yaml", saved=True)
    with claim_for_resume(interrupted, cfg):  # the job that is running holds it
        proc = cli("run", "--resume", str(interrupted))
    assert_clean_error(proc, str(interrupted), "in use by a job that is still running")
    assert snapshot(interrupted) == before


def edit_config(run_dir: Path, **changes) -> None:
    path = run_dir / "config.yaml"
    tree = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        tree[section][key] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def test_resume_refuses_a_config_that_changes_the_models(interrupted):
    edit_config(interrupted, model__layers=[32], models__count=3)
    before = snapshot(interrupted)
    proc = cli("run", "--resume", str(interrupted))
    assert_clean_error(
        proc,
        "--resume continues the job that ran",
        "model.layers ([16, 16] -> [32])",
        "models.count",
    )
    assert snapshot(interrupted) == before


def test_resume_accepts_more_epochs_and_continues(interrupted):
    edit_config(interrupted, train__epochs=3)
    cfg = load_config(interrupted / "config.yaml", saved=True)
    summary = run_local(cfg, interrupted, resume=True)
    assert summary["job"] == "cut" and summary["failed"] == []
    assert {m.epoch for m in History.open(interrupted).metrics(model=0)} == {0, 1, 2}


@pytest.mark.ray
def test_two_jobs_started_together_into_one_run_dir_one_runs(tmp_path, tiny_overrides):
    run_dir = tmp_path / "shared"
    procs = []
    for job in ("first", "second"):
        sets = [a for o in [*tiny_overrides, f"job={job}"] for a in ("--set", o)]
        cmd = [sys.executable, "-m", "ensemble.cli", "run", *sets, "--run-dir", str(run_dir)]
        procs.append(
            (
                job,
                subprocess.Popen([*cmd, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE),
            )
        )
    done = {job: (p.wait(timeout=300), p.stderr.read().decode()) for job, p in procs}
    ran = [job for job, (rc, _) in done.items() if rc == 0]
    refused = [job for job, (rc, _) in done.items() if rc == 2]
    assert len(ran) == 1 and len(refused) == 1, done
    why = " ".join(done[refused[0]][1].split())
    assert why.startswith("error:") and "Traceback" not in why
    assert "in use by a job that is still running" in why or "already holds" in why, why
    (job,) = ran  # the history, the config and the summary all name the one that ran
    h = History.open(run_dir)
    assert h.meta()["job"] == job
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["job"] == job
    assert json.loads((run_dir / "summary.json").read_text())["job"] == job
    assert h.events(kind="coordinator_restored") == []  # one coordinator, never two
    assert len(h.events(kind="finished")) == 4
