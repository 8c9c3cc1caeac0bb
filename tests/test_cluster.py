"""The cluster workflow as the README tells it, with token auth on, on a machine that has no
Ray token yet: `cluster start`, `run --address`, live `history` and `status` while the job
runs, `submit`, `logs`, `cluster stop`; and nothing of the cluster left running after."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ensemble.runtime import procs
from tests.test_security import listening

pytestmark = pytest.mark.ray
ENSEMBLE = [sys.executable, "-m", "ensemble.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unauthenticated(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_cluster_workflow_with_auth_on(tmp_path, tiny_overrides):
    home = tmp_path / "user"  # a new user's machine: no ~/.ray/auth_token yet
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: on
    env.update(HOME=str(home), TETHER_ENSEMBLE_HOME=str(tmp_path / "te"))

    def cli(*args, timeout=300):
        return subprocess.run(
            [sys.executable, "-m", "ensemble.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
        )

    gcs, dash = free_port(), free_port()
    start = cli(
        "cluster", "start", "--port", str(gcs), "--dashboard-port", str(dash), "--num-cpus", "2"
    )
    assert start.returncode == 0, start.stderr
    state = json.loads((tmp_path / "te" / "cluster.json").read_text())
    try:
        token = home / ".ray" / "auth_token"
        assert token.is_file() and token.stat().st_mode & 0o077 == 0  # made, owner-only
        assert unauthenticated(f"http://127.0.0.1:{dash}/api/jobs/") == 401
        assert dash in listening(wildcard_only=False)  # the Jobs API is up...
        assert dash not in listening(wildcard_only=True)  # ...on loopback only
        again = cli("cluster", "start", "--port", str(gcs), "--dashboard-port", str(dash))
        assert again.returncode == 2 and "already running" in again.stderr

        # run on it, and ask the running job's coordinator while it trains
        # the default policy, gravity, on members whose labels differ: merges every round
        over = [o for o in tiny_overrides if not o.startswith("policy.")]
        over += ["policy.name=gravity", "data.groups=2", "data.shift=permute_labels"]
        sets = [a for o in [*over, "job=live", "train.epochs=400"] for a in ("--set", o)]
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ensemble.cli",
                "run",
                *sets,
                "--address",
                f"127.0.0.1:{gcs}",
                "--quiet",
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        live = status = None
        deadline = time.time() + 180
        while job.poll() is None and time.time() < deadline and not (live and status):
            h = cli("history", "live", "--address", f"127.0.0.1:{gcs}", "--json", "--limit", "5")
            if h.returncode == 0 and json.loads(h.stdout):
                live = json.loads(h.stdout)
                s = cli("status", "--json")
                assert s.returncode == 0, s.stderr
                running = json.loads(s.stdout)["running"]
                status = [j for j in running if j["job"] == "live"]
            time.sleep(0.5)
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-3000:]
        assert live, "never answered live: " + h.stderr
        assert status and status[0]["run_dir"].endswith("runs/live")
        assert "InvalidAuthToken" not in err

        run_dir = tmp_path / "shared" / "run"
        sets = [a for o in [*tiny_overrides, "job=submitted"] for a in ("--set", o)]
        sub = cli("submit", *sets, "--run-dir", str(run_dir))  # streams until it ends
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert sub.stdout.splitlines()[0] == "submitted"
        assert "job submitted: 4 models" in sub.stdout  # the driver's summary, streamed
        assert "submitted: SUCCEEDED" in sub.stdout
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["job"] == "submitted" and summary["models"] == 4
        status = cli("status", "--json")
        assert status.returncode == 0, status.stderr
        jobs = json.loads(status.stdout)["submitted"]
        assert [(j["job"], j["status"]) for j in jobs] == [("submitted", "SUCCEEDED")]
        logs = cli("logs", "submitted")
        assert logs.returncode == 0 and "job submitted: 4 models" in logs.stdout
        followed = cli("logs", "submitted", "--follow")  # an ended job: all of it, then done
        assert followed.returncode == 0 and "job submitted: 4 models" in followed.stdout
        missing = cli("logs", "nope")
        assert missing.returncode == 2 and "no job 'nope'" in missing.stderr
        stranger = tmp_path / "stranger"  # a user of this machine without the token
        stranger.mkdir()
        no_token = subprocess.run(
            [*ENSEMBLE, "history", "live", "--address", f"127.0.0.1:{gcs}"],
            env={**env, "HOME": str(stranger)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert no_token.returncode == 2
        assert no_token.stderr.count("\n") == 1 and "uses token authentication" in no_token.stderr
        private = Path(state["temp_dir"]).parent  # after drivers joined, which reopen Ray's
        assert private.stat().st_mode & 0o077 == 0, oct(private.stat().st_mode)
    finally:
        mine = procs.ours(state["tag"])  # before stop: agents and client server included
        stop = cli("cluster", "stop")
    assert stop.returncode == 0, stop.stderr
    assert len(mine) > len(state["pids"]) // 2
    assert procs.alive(mine) == set() and procs.ours(state["tag"]) == set()  # no orphans
    assert cli("cluster", "status").returncode == 1


def instance_of(driver_pid: int) -> set:
    """The processes of the private Ray instance a driver started (tag run-<pid>-...)."""
    found = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            tags = [e for e in env if e.startswith(f"{procs.MARKER}=run-{driver_pid}-".encode())]
            if tags:
                found |= procs.ours(tags[0].split(b"=", 1)[1].decode())
    return found


def test_a_finished_run_leaves_no_ray_process_behind(tmp_path, tiny_overrides):
    sets = [a for o in [*tiny_overrides, "job=clean"] for a in ("--set", o)]
    job = subprocess.Popen(
        [sys.executable, "-m", "ensemble.cli", "run", *sets, "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = set()
    while job.poll() is None:  # what its instance runs, while it runs
        seen |= instance_of(job.pid)
        time.sleep(0.5)
    assert job.returncode == 0, job.stderr.read()[-2000:]
    assert len(seen) >= 4  # gcs, raylet, agents, workers: the scan sees them
    assert procs.alive(seen) == set()  # agents and workers included


def test_status_without_a_cluster_answers_at_once(tmp_path):
    env = {**os.environ, "TETHER_ENSEMBLE_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", "ensemble.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,  # a hang fails here
    )
    assert out.returncode == 2 and "no cluster" in out.stderr
    dead = subprocess.run(
        [sys.executable, "-m", "ensemble.cli", "status", "--address", "127.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 2 and "nothing answers" in dead.stderr


def test_a_shipped_package_is_the_whole_ensemble_package_worker_included(tmp_path):
    from ensemble.runtime.submit import job_env

    assert job_env(tmp_path, False) == {"working_dir": str(tmp_path)}
    shipped = job_env(tmp_path, True)
    (package,) = map(Path, shipped["py_modules"])
    assert package.name == "ensemble" and (package / "runtime" / "worker.py").is_file()
    assert (package / "__init__.py").is_file()
