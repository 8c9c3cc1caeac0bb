"""Nothing listens beyond loopback, no pickles from user files, no path traversal."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.config import load_config
from ensemble.errors import ConfigError, DataError
from ensemble.history import HistoryWriter
from ensemble.outputs.inference import read_inputs
from ensemble.runtime.cluster import ensure_token


def listening(wildcard_only: bool) -> set[int]:
    """Ports in LISTEN state on 0.0.0.0 (IPv4) or :: (IPv6), from /proc/net."""
    ports = set()
    for table, anyaddr in (("/proc/net/tcp", "00000000"), ("/proc/net/tcp6", "0" * 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port = local.split(":")
            if state == "0A" and (addr == anyaddr or not wildcard_only):
                ports.add(int(port, 16))
    return ports


@pytest.mark.ray
def test_local_instance_listens_on_loopback_only():
    import ray

    from ensemble.runtime.driver import start_ray

    before = listening(wildcard_only=True)
    start_ray(None)
    try:
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert listening(wildcard_only=True) - before == set()  # no new 0.0.0.0 listener
    finally:
        ray.shutdown()


@pytest.mark.parametrize("job", ["../evil", "/etc/passwd", "a/b", "..", "", ".hidden", "x" * 65])
def test_job_names_cannot_traverse(job):
    with pytest.raises(ConfigError, match="job"):
        load_config(None, [f"job={job!s}"] if job else ["job=''"])


def test_npy_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="x.npy: not a numeric table"):
        read_inputs(path)


# ------------------------------------------------------------------ tokens and temp dirs


def no_token_yet(monkeypatch, tmp_path) -> Path:
    """A user's machine without a Ray token: HOME in tmp_path; returns where Ray's goes."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return tmp_path / ".ray" / "auth_token"


def test_a_new_token_is_owner_only_in_an_owner_only_directory(monkeypatch, tmp_path):
    token = no_token_yet(monkeypatch, tmp_path)
    path, fixed = ensure_token()
    assert path == token and fixed == []
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.parent.stat().st_mode & 0o777 == 0o700


def test_a_token_others_can_read_is_tightened_and_said(monkeypatch, tmp_path):
    token = no_token_yet(monkeypatch, tmp_path)
    token.parent.mkdir(mode=0o755)
    token.write_text("abc")  # as Ray itself writes one: 0644 in a 0755 directory
    os.chmod(token, 0o644)
    os.chmod(token.parent, 0o755)
    path, fixed = ensure_token()
    assert token.read_text() == "abc"  # the same token, kept
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.parent.stat().st_mode & 0o777 == 0o700
    assert len(fixed) == 2 and "0600" in fixed[1] and "0700" in fixed[0]


@pytest.mark.ray
def test_a_local_run_with_token_auth_makes_a_private_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no token here yet: Ray's default turns token auth on
    code = (
        "from ensemble.runtime.cluster import local_ray_env; local_ray_env(); "
        "from ensemble.runtime.driver import start_ray, stop_ray; stop_ray(start_ray(None))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
    assert token.parent.stat().st_mode & 0o777 == 0o700


def test_cluster_start_honours_auth_off_and_makes_a_private_temp_dir(monkeypatch, tmp_path):
    """RAY_AUTH_MODE=disabled in the user's environment: the head starts without token
    auth and the checks run without one (they used to send none to a token head and wait
    60 s); its temp dir is a fresh 0700 one, not a fixed name in /tmp."""
    from ensemble.runtime import cluster

    token = no_token_yet(monkeypatch, tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("TETHER_ENSEMBLE_HOME", str(tmp_path / "te"))
    seen = {}

    def fake_ray_start(cmd, env, **kw):
        seen["env"], seen["cmd"] = env, cmd
        temp = next(c for c in cmd if c.startswith("--temp-dir=")).split("=", 1)[1]
        os.makedirs(temp)
        os.chmod(temp, 0o777)  # what Ray does to its temp dir, each time a driver joins
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cluster.subprocess, "run", fake_ray_start)
    monkeypatch.setattr(cluster, "wait_ready", lambda st, timeout: seen.setdefault("st", st))
    monkeypatch.setattr(cluster, "free_port", iter(range(40000, 40010)).__next__)
    st = cluster.start(port=free_tcp_port(), dashboard_port=free_tcp_port())
    try:
        assert seen["env"]["RAY_AUTH_MODE"] == "disabled" and st["auth"] == "disabled"
        assert not token.exists()  # no token made for a cluster that takes none
        private = Path(st["temp_dir"]).parent  # no one else can even look into Ray's
        assert private.stat().st_mode & 0o777 == 0o700 and private.parent == Path("/tmp")
        assert private.name.startswith(f"tether-ensemble-{os.getuid()}-")
        assert private.name != f"tether-ensemble-{os.getuid()}-{st['address'].split(':')[1]}"
    finally:
        shutil.rmtree(Path(st["temp_dir"]).parent, ignore_errors=True)


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ paths the history names


def test_retention_deletes_only_its_own_generation_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    w = HistoryWriter(run / "history.sqlite", "j", "", retention="last:1")
    t = {"fc1": np.ones((2, 2), np.float32)}
    w.generation(0, 0, 1, 0, t)
    w.generation(0, 1, 2, 1, t)  # generation 0 goes: its file is deleted
    assert not (run / "generations" / "round_000001.safetensors").exists()
    with w.tx():  # a history edited to name a file outside the run
        w.conn.execute("UPDATE generations SET path = '../outside/victim.txt' WHERE generation = 1")
    w.generation(0, 2, 3, 2, t)  # drops generation 1, which "is" the victim
    w.close()
    assert victim.read_text() == "precious"
    assert (run / "generations" / "round_000003.safetensors").exists()
