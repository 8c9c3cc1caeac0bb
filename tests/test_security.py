"""Nothing listens beyond loopback, no pickles from user files, no path traversal."""

from pathlib import Path

import numpy as np
import pytest

from ensemble.config import load_config
from ensemble.errors import ConfigError, DataError
from ensemble.inference import read_inputs


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

    from ensemble.driver import start_ray

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
