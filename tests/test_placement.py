"""Placement on a multi-node cluster with logical GPUs (one machine, `ray.cluster_utils`)."""

import pytest
from ray.cluster_utils import Cluster

from ensemble.api import History
from ensemble.config import load_config
from ensemble.errors import EnsembleError
from ensemble.runtime.driver import run_job
from tests.conftest import TINY

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def gpu_cluster():
    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    nodes = [c.add_node(num_cpus=2, num_gpus=2) for _ in range(3)]
    c.wait_for_nodes()
    yield c, nodes
    c.shutdown()


def test_spread_fractional_gpus_pack_and_history_completes(gpu_cluster, tmp_path):
    cluster, nodes = gpu_cluster
    cfg = load_config(
        None,
        TINY
        + [
            "job=placed",
            "models.count=6",
            "resources.num_gpus_per_model=0.5",
            "resources.num_cpus_per_worker=0.5",
            "resources.placement=spread",
        ],
    )
    summary = run_job(cfg, tmp_path / "run", address=cluster.address)
    h = History.open(tmp_path / "run")
    started = {e.model: e.detail for e in h.events(kind="started")}
    assert sorted(started) == list(range(6))
    per_node: dict[str, list] = {}
    for d in started.values():
        per_node.setdefault(d["node"], []).append(d["gpus"])
    assert set(per_node) == {n.node_id for n in nodes}  # spread: every node has workers
    assert sorted(len(v) for v in per_node.values()) == [2, 2, 2]
    for gpus in per_node.values():  # 2 x 0.5 GPU on a node share one GPU id: packed
        assert all(len(g) == 1 for g in gpus) and len({g[0] for g in gpus}) == 1
    assert {d["device"] for d in started.values()} == {"cpu"}  # logical GPUs, no CUDA
    assert len(h.events(kind="finished")) == 6 and summary["failed"] == []


def test_job_that_cannot_fit_fails_clearly_without_starting(gpu_cluster, tmp_path):
    cluster, _ = gpu_cluster
    cfg = load_config(
        None,
        TINY
        + [
            "job=toobig",
            "models.count=8",
            "resources.num_gpus_per_model=1",
            "resources.models_per_worker=1",  # 8 workers of a GPU each; the cluster has 6
            "resources.placement_timeout=3",
        ],
    )
    with pytest.raises(EnsembleError, match="cannot fit the job: 8 workers"):
        run_job(cfg, tmp_path / "run", address=cluster.address)
    assert not (tmp_path / "run").exists()  # nothing half-started, nothing left behind
    run_job(
        cfg.model_copy(
            update={"resources": cfg.resources.model_copy(update={"models_per_worker": "auto"})}
        ),
        tmp_path / "run",
        address=cluster.address,
    )
    assert (tmp_path / "run" / "summary.json").exists()  # the rerun is not refused
