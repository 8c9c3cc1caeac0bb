"""`ensemble cluster start`, `submit` through the Jobs API, `status`, `logs`, `cluster stop`."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_security import listening

pytestmark = pytest.mark.ray


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for a reaper here)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_cluster_submit_and_stop(tmp_path, tiny_overrides):
    env = {**os.environ, "TETHER_ENSEMBLE_HOME": str(tmp_path / "home")}

    def cli(*args, timeout=300):
        return subprocess.run(
            [sys.executable, "-m", "ensemble.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    gcs, dash = free_port(), free_port()
    start = cli(
        "cluster", "start", "--port", str(gcs), "--dashboard-port", str(dash), "--num-cpus", "2"
    )
    assert start.returncode == 0, start.stderr
    state = json.loads((tmp_path / "home" / "cluster.json").read_text())
    try:
        assert state["dashboard"] == f"http://127.0.0.1:{dash}"
        assert dash in listening(wildcard_only=False)  # the Jobs API is up...
        assert dash not in listening(wildcard_only=True)  # ...on loopback only
        again = cli("cluster", "start", "--port", str(gcs), "--dashboard-port", str(dash))
        assert again.returncode == 2 and "already running" in again.stderr

        run_dir = tmp_path / "shared" / "run"
        sets = [a for o in tiny_overrides + ["job=submitted"] for a in ("--set", o)]
        sub = cli("submit", *sets, "--run-dir", str(run_dir), "--wait")
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert sub.stdout.splitlines()[0] == "submitted"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["job"] == "submitted" and summary["models"] == 4

        status = cli("status", "--json")
        assert status.returncode == 0, status.stderr
        jobs = json.loads(status.stdout)["submitted"]
        assert [(j["job"], j["status"]) for j in jobs] == [("submitted", "SUCCEEDED")]
        logs = cli("logs", "submitted")
        assert logs.returncode == 0 and "ensemble" in logs.stdout
        missing = cli("logs", "nope")
        assert missing.returncode == 2 and "no job 'nope'" in missing.stderr
    finally:
        stop = cli("cluster", "stop")
    assert stop.returncode == 0, stop.stderr
    left = [p for p in state["pids"] if running(p)]
    assert left == []
    assert cli("cluster", "status").returncode == 1
