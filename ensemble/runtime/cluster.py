"""`ensemble cluster start|stop|status`: a local Ray head for this machine, loopback only.

`start` runs `ray start --head` bound to 127.0.0.1 (GCS, dashboard and Jobs API), with its
own temp dir and free ports for every side service, **token authentication on**: it makes
sure a token exists (Ray's own file, `~/.ray/auth_token`, or `$RAY_AUTH_TOKEN_PATH`),
generating one on a machine that has none. It reports success only once the Jobs API
answers an authenticated request, refuses an unauthenticated one (401), and the dashboard
agent (which runs submitted jobs) is up. It records the address in
$TETHER_ENSEMBLE_HOME/cluster.json (default ~/.tether-ensemble), where `submit`, `status`,
`logs` and `stop` find it. `stop` stops exactly that cluster's processes (ensemble.runtime.procs),
never another Ray process on the machine.

`client_auth()` is what every client of a cluster (`run --address`, live `history`,
`status`, the Jobs API commands) calls first: with a token on this machine it turns token
auth on for this process, so its requests carry the token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ensemble.errors import EnsembleError
from ensemble.runtime import procs


def home() -> Path:
    return Path(os.environ.get("TETHER_ENSEMBLE_HOME", Path.home() / ".tether-ensemble"))


def state_file() -> Path:
    return home() / "cluster.json"


def token_path() -> Path:
    """Where Ray looks for its token: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_token() -> tuple[Path, list[str]]:
    """The token file, made if this machine has none yet: 0600, in a 0700 directory when
    that is Ray's own (~/.ray) or one this made. A token others can read is tightened;
    returns the path and a line for each such fix (the caller says so)."""
    path = token_path()
    fixed = []
    default = path == Path.home() / ".ray" / "auth_token"
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        default = True
    if default and path.parent.stat().st_mode & 0o077:
        os.chmod(path.parent, 0o700)
        fixed.append(f"{path.parent} was open to others: now 0700")
    if path.is_file() and path.read_text().strip():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            fixed.append(f"{path} was readable by others: now 0600")
        return path, fixed
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(secrets.token_hex(32))
    return path, fixed


def auth_off() -> bool:
    """Whether the user turned Ray's token authentication off (RAY_AUTH_MODE=disabled)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(address: str) -> bool:
    """Whether host:port or http://host:port names this machine's loopback."""
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0] in LOOPBACK


def local_ray_env() -> None:
    """Make Ray in this process bind to, and find itself on, 127.0.0.1. Before `import
    ray`: Ray reads it then (without it, Ray 2.60 uses the machine's network address)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before local_ray_env(); it would bind widely")


def ray_env(address: str | None) -> None:
    """Call before Ray is imported: a private instance (address None) or a cluster on this
    machine's loopback is reached on 127.0.0.1; with a token here, requests carry it."""
    if address is None or is_loopback(address):
        local_ray_env()
    client_auth()


def client_auth() -> bool:
    """Send the token with this process's Ray requests when this machine has one and auth
    was not set explicitly. Call before connecting; returns whether token auth is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None and (os.environ.get("RAY_AUTH_TOKEN") or token_path().is_file()):
        os.environ["RAY_AUTH_MODE"] = mode = "token"
        if "ray" in sys.modules:  # Ray caches its config: refresh it
            from ray._raylet import Config

            Config.initialize("")
    return (mode or "").lower() == "token"


@contextlib.contextmanager
def held_stderr():
    """What reaches this process's stderr (fd 2: Ray's C++ retry warnings) while the block
    runs is held back; yields a function returning it so far. On success it is printed
    after all; after an error the caller says in one line what it meant."""
    sys.stderr.flush()
    saved, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    text = lambda: (held.seek(0), held.read().decode("utf-8", "replace"))[1]  # noqa: E731
    ok = False
    try:
        yield text
        ok = True
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if ok:
            sys.stderr.write(text())
        held.close()


def refused_auth(address: str, ray_lines: str, authed: bool) -> EnsembleError | None:
    """The error for a cluster that refused our token (or its lack), from Ray's lines."""
    if "InvalidAuthToken" not in ray_lines and "Unauthenticated" not in ray_lines:
        return None
    what = "this machine's token" if authed else "a request without a token"
    return EnsembleError(
        f"the Ray cluster at {address} uses token authentication and refused {what}; put "
        f"the cluster's token in {token_path()} (or RAY_AUTH_TOKEN)"
    )


def _ray_cli() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise EnsembleError("the `ray` command is not installed next to this Python")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def status() -> dict | None:
    """The recorded cluster with its processes still alive, or None."""
    f = state_file()
    if not f.is_file():
        return None
    try:
        st = json.loads(f.read_text())
        st["alive"] = sorted(pid for pid, _ in procs.ours(st["tag"]))
    except (ValueError, KeyError, OSError):
        raise EnsembleError(f"{f}: not a cluster record; remove it and start again") from None
    return st


def start(
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    ready_timeout: float = 60.0,
) -> dict:
    """Start a local Ray head on loopback (token auth on unless the user turned it off),
    wait until it answers, and record it in the state file `status` reads."""
    current = status()
    if current and current["alive"]:
        raise EnsembleError(
            f"a cluster started here is already running at {current['address']}"
            " (ensemble cluster stop first)"
        )
    for p, what in ((port, "--port"), (dashboard_port, "--dashboard-port")):
        if answers("127.0.0.1", p):
            raise EnsembleError(f"{what} {p}: something already listens there; pick another")
    # Ray's temp dir inside a private (0700), unguessable one, not a fixed name in /tmp:
    # Ray opens its own to everyone (0777), and does again whenever a driver joins. Short:
    # Ray's socket paths must stay under 108 bytes.
    private = tempfile.mkdtemp(prefix=f"tether-ensemble-{os.getuid()}-", dir="/tmp")
    temp_dir = f"{private}/r"
    tag = f"cluster-{port}-{secrets.token_hex(4)}"
    agent = free_port()
    cmd = head_command(port, dashboard_port, agent, temp_dir, num_cpus, num_gpus)
    off = auth_off()  # the user's explicit choice, honoured, and said aloud
    token, fixed = (None, []) if off else ensure_token()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to loopback
        "RAY_AUTH_MODE": "disabled" if off else "token",  # the head serves jobs: code
        procs.MARKER: tag,
        # submitted jobs run `ensemble ...`: this Python's scripts must be on their PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        procs.terminate(procs.ours(tag))
        shutil.rmtree(private, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise EnsembleError(f"ray start failed: {' | '.join(tail)}")
    st = {
        "address": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "temp_dir": temp_dir,
        "tag": tag,
        "agent_port": agent,
        "token_path": str(token) if token else None,
        "auth": "disabled" if off else "token",
        "fixed": fixed,
        "started": time.time(),
    }
    try:
        wait_ready(st, ready_timeout)
    except EnsembleError:
        procs.terminate(procs.ours(tag))
        shutil.rmtree(private, ignore_errors=True)
        raise
    st["pids"] = sorted(pid for pid, _ in procs.ours(tag))
    home().mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(st, indent=1))
    return st


def head_command(port, dashboard_port, agent, temp_dir, num_cpus, num_gpus) -> list[str]:
    """`ray start --head` on loopback, every port of its own chosen and free."""
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent}",  # chosen free: a clash kills the agent
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return cmd


def wait_ready(st: dict, timeout: float) -> None:
    """The head is ready when its dashboard agent listens, the Jobs API answers the token
    and refuses a request without one. Raise saying which never happened."""
    deadline = time.time() + timeout
    checks = {
        "the dashboard agent (it runs submitted jobs) listening on port "
        f"{st['agent_port']}": lambda: answers("127.0.0.1", st["agent_port"]),
        f"the Jobs API at {st['dashboard']} answering"
        + ("" if st.get("auth") == "disabled" else " the token"): lambda: _jobs_answer(st),
    }
    for what, check in checks.items():
        while not check():
            if time.time() > deadline:
                logs = Path(st["temp_dir"]) / "session_latest" / "logs"
                raise EnsembleError(
                    f"the cluster did not come up: no {what} after {timeout:g}s "
                    f"(Ray's logs: {logs})"
                )
            time.sleep(0.3)
    code = unauthenticated_status(st["dashboard"])
    if st.get("auth") != "disabled" and code != 401:
        raise EnsembleError(
            f"the Jobs API at {st['dashboard']} answered an unauthenticated request with "
            f"{code}, not 401: token authentication is not enforced; not starting"
        )


def jobs_client(address: str):
    """A Jobs API client of the cluster at `address` (http://host:port); with a token on
    this machine, every request carries it."""
    client_auth()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, 401 without the token, bad URL
        raise EnsembleError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


def _jobs_answer(st: dict) -> bool:
    try:
        jobs_client(st["dashboard"]).list_jobs()
        return True
    except EnsembleError:
        return False
    except Exception:
        return False


def unauthenticated_status(dashboard: str) -> int:
    """The HTTP status the Jobs API gives a request that carries no token."""
    try:
        with urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def stop(timeout: float = 5.0) -> list[int]:
    """Stop every process of the cluster `start` started, agents and client server too."""
    st = status()
    if st is None:
        raise EnsembleError(f"no cluster was started here ({state_file()} does not exist)")
    mine = procs.ours(st["tag"])
    left = procs.terminate(mine, timeout)
    if left:
        raise EnsembleError(f"could not stop processes {sorted(p for p, _ in left)}")
    state_file().unlink(missing_ok=True)
    return sorted(pid for pid, _ in mine)


def default_address(kind: str) -> str | None:
    """'gcs' (host:port) or 'dashboard' (http URL) of the cluster started here, if running."""
    st = status()
    if not st or not st["alive"]:
        return None
    return st["address"] if kind == "gcs" else st["dashboard"]
