"""The coordinator under 32 concurrent publishers on loopback: nothing lost, nothing doubled."""

import pytest
import ray

from benchmarks.load import drive
from ensemble.api import History

pytestmark = pytest.mark.ray


def test_32_publishers_lose_and_duplicate_nothing(tmp_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = drive(tmp_path, publishers=32, actors=4, seconds=3.0)
    finally:
        ray.shutdown()
    acked = out["acked"]
    assert len(acked) > 100 and out["rounds"] > 0
    assert len(set(acked)) == len(acked)  # no publication acknowledged twice
    recorded = {(p.model, p.step) for p in History.open(tmp_path).publications()}
    assert recorded == set(acked)  # every acknowledged one is in the history, no more
    assert {m for m, _ in acked} == set(range(32))


def test_stack_reports_lose_and_duplicate_nothing(tmp_path):
    """The protocol's own shape: each actor reports its 8 models in one call."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = drive(tmp_path, publishers=32, actors=4, seconds=3.0, stacked=True)
    finally:
        ray.shutdown()
    acked = out["acked"]
    assert len(acked) > 100 and len(out["latencies"]) * 8 == len(acked)
    assert len(set(acked)) == len(acked)
    recorded = {(p.model, p.step) for p in History.open(tmp_path).publications()}
    assert recorded == set(acked) and {m for m, _ in acked} == set(range(32))
