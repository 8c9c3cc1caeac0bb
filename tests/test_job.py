"""A real job on a real local Ray instance, with tiny models."""

import json

import numpy as np
import pytest
import ray
from safetensors.numpy import load_file

from ensemble.history import HistoryReader
from ensemble.runtime.driver import NAMESPACE, run_job
from tests.conftest import TINY

pytestmark = pytest.mark.ray


def test_ray_job_writes_run_dir_and_consistent_history(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    seen = []

    def on_progress(p):
        if not seen:  # the coordinator is a named actor other processes can find
            seen.append(ray.get_actor(tiny_cfg.job, namespace=NAMESPACE) is not None)
        seen.append(p["publications"])

    summary = run_job(tiny_cfg, run_dir, on_progress=on_progress, poll_seconds=0.2)

    assert seen[0] is True
    assert not ray.is_initialized()  # the local instance we started is shut down
    names = {p.name for p in run_dir.iterdir()} - {
        "history.sqlite-wal",
        "history.sqlite-shm",
        "history.lock",
    }
    made = {"config.yaml", "history.sqlite", "summary.json", "models", "generations", "run.lock"}
    assert names == made
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in ("job", "models", "ensemble", "members", "merges", "drifts", "wall_seconds"):
        assert key in summary
    assert summary["models"] == 4 and len(summary["members"]) == 4
    assert 0 <= summary["ensemble"]["nll"] and 0 <= summary["ensemble"]["accuracy"] <= 1
    assert summary["ensemble"]["accuracy"] > 0.5  # 2 epochs on digits is far above chance

    h = HistoryReader(run_dir / "history.sqlite")
    decisions = h.decisions(pairs=False)  # counted per instruction
    assert summary["merges"] == sum(d.kind == "merge" for d in decisions) - summary["rejected"]
    assert summary["drifts"] == sum(d.kind == "drift" for d in decisions)
    assert summary["merges"] + summary["drifts"] > 0
    assert h.count("publications") == summary["publications"]
    assert h.meta()["job"] == tiny_cfg.job
    assert len(h.events("finished")) == 4

    weights = load_file(str(run_dir / "models" / "model_0.safetensors"))
    assert weights["tether.fc1"].shape == weights["fc1.weight"].shape  # the module's own keys
    assert np.isfinite(weights["tether.out"]).all()


def test_joins_an_existing_cluster_and_leaves_it_running(tiny_cfg, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    try:
        summary = run_job(tiny_cfg, tmp_path / "run", address=cluster.address)
        assert summary["models"] == 4
        assert (tmp_path / "run" / "summary.json").is_file()
        # the cluster is someone else's: still up for the next driver
        ray.init(address=cluster.address)
        assert ray.cluster_resources().get("CPU") == 2
        ray.shutdown()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("per_worker", [1, 2])
def test_ray_job_with_every_merging_option(tmp_path, tiny_overrides, per_worker):
    """Function-space compat, alignment, weight merge, guard and repulsive drift, through
    real Ray workers (single-model and stacked): the history and summary agree."""
    from ensemble.config import load_config

    cfg = load_config(
        None,
        [
            *tiny_overrides,
            f"job=opts-{per_worker}",
            "compat.fn=cka",
            "compat.normalize=zscore",
            "train.epochs=3",
            "coordinator.round_every=2",  # many rounds, so decisions happen under any load
            "policy.merge_above=0.0",  # about half the pairs: merges happen under any timing
            "policy.drift_below=0.0",
            "policy.align=true",
            "policy.share=both",
            "policy.guard=true",
            "policy.drift=repulsive",
            f"resources.models_per_worker={per_worker}",
        ],
    )
    summary = run_job(cfg, tmp_path / "run", poll_seconds=0.2)
    h = HistoryReader(tmp_path / "run" / "history.sqlite")
    decisions = h.decisions(pairs=False)  # counted per instruction
    why = (summary, h.count("rounds"), h.count("publications"), h.events())
    attempted = sum(d.kind == "merge" for d in decisions)
    assert summary["merges_attempted"] == attempted > 0, why
    assert summary["merges"] == attempted - summary["rejected"] >= 0, why
    drifts = [d for d in decisions if d.kind == "drift"]
    assert summary["drifts"] == len(drifts) > 0 and {d.partner for d in drifts} == {None}
    rounds = dict(h.rounds())  # a repulsive drift: away from every other model of its round
    assert all(set(d.group) == set(rounds[d.round]) - {d.model} for d in drifts), drifts
    assert summary["rejected"] == len(h.events("rejected"))
    assert len(h.events("finished")) == 4
    assert summary["ensemble"]["accuracy"] > 0.5
    for m in range(4):
        w = load_file(str(tmp_path / "run" / "models" / f"model_{m}.safetensors"))
        assert all(np.isfinite(v).all() for v in w.values())


QUIET = [  # gravity, publishing every 20 steps: 3 of 4 exchanges carry nothing, skipped
    *[o for o in TINY if not o.startswith("policy.")],
    "policy.name=gravity",
    "data.groups=2",
    "data.shift=permute_labels",
    "trigger.k=20",
    "trigger.poll_steps=5",
]


@pytest.mark.parametrize("base", [TINY, QUIET], ids=["every exchange", "quiet exchanges skipped"])
def test_sync_mode_gives_one_ensemble_per_seed_on_ray_and_in_one_process(tmp_path, base):
    """coordinator.mode sync: rounds fall at fixed steps and mail lands at fixed steps, so
    two Ray runs of one seed and the in-process run give the same ensemble (also when
    exchanges that carry nothing are skipped)."""
    from ensemble.config import load_config
    from ensemble.runtime.job import run_local

    over = [*base, "coordinator.mode=sync", "resources.models_per_worker=2", "train.epochs=3"]
    runs = []
    for i in range(2):
        cfg = load_config(None, [*over, f"job=same-{i}"])
        runs.append((run_job(cfg, tmp_path / f"ray{i}"), tmp_path / f"ray{i}"))
    cfg = load_config(None, [*over, "job=same-local"])
    runs.append((run_local(cfg, tmp_path / "local", groups=[[0, 1], [2, 3]]), tmp_path / "local"))
    (first, first_dir), *others = runs
    assert first["merges"] + first["drifts"] > 0  # decisions were made: the test means something
    for s, run_dir in others:
        for key in ("merges", "drifts", "rejected", "rounds", "publications"):
            assert s[key] == first[key], key
        for key in ("accuracy", "nll"):
            assert s["ensemble"][key] == pytest.approx(first["ensemble"][key], abs=1e-6)
        for m in range(4):
            a = load_file(str(first_dir / "models" / f"model_{m}.safetensors"))
            b = load_file(str(run_dir / "models" / f"model_{m}.safetensors"))
            for k in a:
                np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
