"""Fault injection on real local Ray instances with tiny models: the job completes and its
history has no gaps."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from ensemble.api import History
from ensemble.config import load_config
from ensemble.errors import EnsembleError
from ensemble.runtime import procs
from ensemble.runtime.driver import run_job
from ensemble.runtime.service import NAMESPACE
from tests.test_cluster import instance_of

pytestmark = pytest.mark.ray


def longer(cfg, epochs=30, **faults):
    return cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"epochs": epochs}),
            "faults": cfg.faults.model_copy(update=faults),
        }
    )


def wait_for(predicate, timeout=120, every=0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return True
        except Exception:
            pass
        time.sleep(every)
    return False


def assert_complete(run_dir, cfg, summary):
    """Every model finished every epoch, with its metrics, and nothing is missing."""
    h = History.open(run_dir)
    epochs, count = cfg.train.epochs, cfg.models.count
    assert sorted(e.model for e in h.events(kind="finished"))[-count:] == list(range(count))
    for m in range(count):
        got = sorted({r.epoch for r in h.metrics(model=m) if r.split == "val"})
        assert got == list(range(epochs)), (m, got)
    ens = sorted({r.epoch for r in h.metrics(model=-1)})
    assert ens == list(range(epochs))
    assert summary["failed"] == [] and len(summary["members"]) == count
    steps = {m["steps"] for m in summary["members"]}
    assert len(steps) == 1  # everyone trained the full job
    # nothing lost, nothing doubled: every acknowledged publication is one recorded row
    assert summary["publications"] == h.count("publications") > 0
    events = [(e.kind, e.model, e.step, json.dumps(e.detail, sort_keys=True)) for e in h.events()]
    assert len(events) == len(set(events)), "an event was recorded twice"
    assert len({e.model for e in h.events(kind="finished")}) == len(h.events(kind="finished"))
    return h


def run_in_thread(cfg, run_dir, address):
    out = {}

    def target():
        try:
            out["summary"] = run_job(cfg, run_dir, address=address)
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, out


@pytest.fixture
def cluster():
    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    yield c
    c.shutdown()


def test_killed_worker_restarts_from_its_checkpoint(tiny_cfg, tmp_path, cluster):
    cfg = longer(tiny_cfg)
    run_dir = tmp_path / "run"
    t, out = run_in_thread(cfg, run_dir, cluster.address)
    ckpts = run_dir / "checkpoints"
    assert wait_for(
        lambda: History.open(run_dir).count("metrics") >= 16 and any(ckpts.glob("stack_*.pt"))
    )
    (started,) = History.open(run_dir).events(kind="started", model=1)
    os.kill(started.detail["pid"], signal.SIGKILL)  # model 1's worker process, as a crash
    t.join(timeout=400)
    assert "error" not in out, out.get("error")
    h = assert_complete(run_dir, cfg, out["summary"])
    restarts = h.events(kind="restarted")
    assert 1 in {e.model for e in restarts}  # its whole stack restarted...
    assert all(e.step > 0 for e in restarts)  # ...from its checkpoint, not from step 0
    pid = started.detail["pid"]
    assert all(e.detail["pid"] != pid for e in restarts)  # in a new worker process


def test_a_worker_dead_for_good_is_a_failed_member_with_its_reason(tiny_cfg, tmp_path, cluster):
    cfg = longer(tiny_cfg, epochs=120, max_restarts=0)
    run_dir = tmp_path / "run"
    t, out = run_in_thread(cfg, run_dir, cluster.address)
    assert wait_for(lambda: History.open(run_dir).count("metrics") >= 8)
    (started,) = History.open(run_dir).events(kind="started", model=1)
    os.kill(started.detail["pid"], signal.SIGKILL)  # no restarts left: gone for good
    t.join(timeout=400)
    assert "error" not in out, out.get("error")
    summary = out["summary"]
    pid = started.detail["pid"]
    gone = {e.model for e in History.open(run_dir).events("started") if e.detail["pid"] == pid}
    assert [f["model"] for f in summary["failed"]] == sorted(gone) and 1 in gone
    for f in summary["failed"]:
        assert f["reason"].startswith("ActorDiedError") or "died" in f["reason"], f
    assert {m["model"] for m in summary["members"]} == set(range(4)) - gone


def test_an_unwritable_history_ends_the_job_with_one_line_naming_it(tiny_cfg, tmp_path, cluster):
    cfg = longer(tiny_cfg, epochs=30)
    run_dir = tmp_path / "run"
    t, out = run_in_thread(cfg, run_dir, cluster.address)
    assert wait_for(lambda: History.open(run_dir).count("rounds") >= 2)
    (run_dir / "generations").rename(tmp_path / "moved")
    (run_dir / "generations").write_text("in the way")  # the next snapshot cannot be written
    t.join(timeout=400)
    err = out.get("error")
    assert isinstance(err, EnsembleError), err
    assert "cannot write the history" in str(err) and "generations" in str(err)
    assert not (run_dir / "summary.json").exists()


def test_killed_coordinator_restarts_from_the_history(tiny_cfg, tmp_path, cluster):
    cfg = longer(tiny_cfg)
    run_dir = tmp_path / "run"
    t, out = run_in_thread(cfg, run_dir, cluster.address)
    assert wait_for(lambda: History.open(run_dir).count("rounds") >= 5)
    ray.kill(ray.get_actor(cfg.job, namespace=NAMESPACE), no_restart=False)
    t.join(timeout=400)
    assert "error" not in out, out.get("error")
    h = assert_complete(run_dir, cfg, out["summary"])
    assert len(h.events(kind="coordinator_restored")) == 1
    # no duplicate publication: (model, step) is unique in the schema; the summary's
    # counts, rebuilt after the restart, agree with the records
    assert out["summary"]["merges_attempted"] == len(h.merges(pairs=False))
    assert out["summary"]["drifts"] == len(h.drifts(pairs=False))


def test_lost_node_reschedules_its_workers(tiny_cfg, tmp_path):
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    nodes = [cluster.add_node(num_cpus=2) for _ in range(3)]
    cfg = longer(
        tiny_cfg.model_copy(update={"models": tiny_cfg.models.model_copy(update={"count": 3})}),
        epochs=40,
    )
    run_dir = tmp_path / "run"
    try:
        cluster.wait_for_nodes()
        t, out = run_in_thread(cfg, run_dir, cluster.address)
        assert wait_for(lambda: History.open(run_dir).count("metrics") >= 12)
        started = {e.model: e.detail["node"] for e in History.open(run_dir).events("started")}
        busy = [n for n in nodes if n.node_id in started.values()]
        cluster.remove_node(busy[0])  # its workers die with it
        t.join(timeout=400)
        assert "error" not in out, out.get("error")
        h = assert_complete(run_dir, cfg, out["summary"])
        assert h.events(kind="restarted"), "no worker was rescheduled"
    finally:
        cluster.shutdown()


def test_killed_driver_then_killed_resume_then_resume_continues(tmp_path, tiny_overrides):
    import json

    run_dir = tmp_path / "job"
    sets = [a for o in tiny_overrides + ["train.epochs=40", "job=resumable"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "ensemble.cli", "run"]

    def killed(args, ready):
        """Start `ensemble run ARGS`, SIGKILL it once `ready()`; its Ray processes."""
        proc = subprocess.Popen(
            [*cmd, *args, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            assert wait_for(ready, timeout=240)
            instance = instance_of(proc.pid)
        finally:
            proc.send_signal(signal.SIGKILL)  # the driver dies without a word
            proc.wait()
        return instance

    instance = killed([*sets, "--run-dir", str(run_dir)], lambda: count(run_dir) >= 24)
    assert len(instance) >= 4
    assert wait_for(lambda: not procs.alive(instance), timeout=30)  # no orphans after 30 s
    before = History.open(run_dir)
    steps_before = {m: max(p.step for p in before.publications(model=m)) for m in range(4)}
    assert not (run_dir / "summary.json").exists()

    # a resume killed halfway, once it trains again, leaves the run resumable
    halfway = count(run_dir) + 8
    instance = killed(["--resume", str(run_dir)], lambda: count(run_dir) >= halfway)
    assert History.open(run_dir).events(kind="resumed")  # it did get going
    assert wait_for(lambda: not procs.alive(instance), timeout=30)
    assert not (run_dir / "summary.json").exists()

    done = subprocess.run(
        [*cmd, "--resume", str(run_dir), "--quiet"], capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(run_dir / "config.yaml")
    h = assert_complete(run_dir, cfg, summary)
    resumed = h.events(kind="resumed")
    assert {e.model for e in resumed} == {0, 1, 2, 3} and len(resumed) >= 8  # twice each
    total = summary["members"][0]["steps"]
    first = {}
    for e in resumed:
        first.setdefault(e.model, e)
    for e in first.values():  # from a checkpoint, not from step 0: it did not start over
        # (the dead driver's workers may outlive it by a few seconds and checkpoint once
        # more, so the resume point can be past what was published before the kill)
        assert 0 < e.step < total
        assert e.step >= min(steps_before[e.model], total) // 2
    again = subprocess.run([*cmd, "--resume", str(run_dir)], capture_output=True, text=True)
    assert again.returncode == 2 and "already finished" in again.stderr


def count(run_dir) -> int:
    return History.open(run_dir).count("metrics")
