"""`ensemble cluster start|stop|status`: a local Ray head for this machine, loopback only.

`start` runs `ray start --head` bound to 127.0.0.1 (GCS, dashboard and Jobs API), with its
own temp dir, and records the address and the process ids of exactly that cluster in
$TETHER_ENSEMBLE_HOME/cluster.json (default ~/.tether-ensemble). `submit`, `status` and
`logs` find it there by default. `stop` stops only those processes, never every Ray
process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ensemble.errors import EnsembleError


def home() -> Path:
    return Path(os.environ.get("TETHER_ENSEMBLE_HOME", Path.home() / ".tether-ensemble"))


def state_file() -> Path:
    return home() / "cluster.json"


def _ray_cli() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise EnsembleError("the `ray` command is not installed next to this Python")
    return found


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (our cluster's own temp dir)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            except OSError:
                continue
            if marker in cmd:
                out.append(int(proc.name))
    return sorted(out)


def status() -> dict | None:
    """The recorded cluster with its processes still alive, or None."""
    f = state_file()
    if not f.is_file():
        return None
    st = json.loads(f.read_text())
    st["alive"] = [p for p in _pids_with(st["temp_dir"]) if p in st["pids"]]
    return st


def start(
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
) -> dict:
    current = status()
    if current and current["alive"]:
        raise EnsembleError(
            f"a cluster started here is already running at {current['address']}"
            " (ensemble cluster stop first)"
        )
    temp_dir = f"/tmp/tether-ensemble-ray-{os.getuid()}-{port}"  # short: socket paths
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to loopback
        # submitted jobs run `ensemble ...`: this Python's scripts must be on their PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise EnsembleError(f"ray start failed: {' | '.join(tail)}")
    st = {
        "address": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "temp_dir": temp_dir,
        "pids": _pids_with(temp_dir),
        "started": time.time(),
    }
    home().mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(st, indent=1))
    return st


def stop(timeout: float = 15.0) -> list[int]:
    """Stop the processes `start` recorded (and still running with its temp dir)."""
    st = status()
    if st is None:
        raise EnsembleError(f"no cluster was started here ({state_file()} does not exist)")
    alive = st["alive"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline:
            alive = [p for p in _pids_with(st["temp_dir"]) if p in st["pids"]]
            if not alive:
                break
            time.sleep(0.2)
        if not alive:
            break
    state_file().unlink(missing_ok=True)
    return st["pids"]


def default_address(kind: str) -> str | None:
    """'gcs' (host:port) or 'dashboard' (http URL) of the cluster started here, if running."""
    st = status()
    if not st or not st["alive"]:
        return None
    return st["address"] if kind == "gcs" else st["dashboard"]
