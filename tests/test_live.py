"""Live queries: another process asks a running job's coordinator, and what it saw is
exactly what the job's history file holds afterwards."""

import json
import threading
import time

import pytest
from ray.cluster_utils import Cluster

from ensemble.api import History
from ensemble.runtime.driver import run_job
from tests.conftest import cli

pytestmark = pytest.mark.ray


def test_live_history_matches_final_database(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"epochs": 400})})
    run_dir = tmp_path / "run"
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    outcome = {}
    job = threading.Thread(
        target=lambda: outcome.update(summary=run_job(cfg, run_dir, address=cluster.address))
    )
    try:
        job.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.5)
            if (run_dir / "history.sqlite").exists():
                try:
                    if History.open(run_dir).count("instructions") >= 4:
                        break
                except Exception:
                    pass  # schema not yet written
        status = cli("status", "--address", cluster.address, "--json")
        live = cli("history", cfg.job, "--address", cluster.address, "--format", "json")
        assert job.is_alive(), "the job finished before the live query; make it longer"
        assert live.returncode == 0, live.stderr
        seen = json.loads(live.stdout)
        jobs = json.loads(status.stdout)
        assert [j["job"] for j in jobs] == [cfg.job] and len(jobs[0]["models"]) == 4
        job.join(timeout=300)
        assert "summary" in outcome
        final = [d.as_dict() for d in History.open(run_dir).decisions()]
        # no guard here, so no merge is undone; drifts carry no outcome
        assert {r.pop("outcome") for r in seen} <= {"kept", ""}
        assert len(seen) >= 2 and seen == final[: len(seen)]  # same records, same order

        gone = cli("history", cfg.job, "--address", cluster.address)
        assert gone.returncode == 2
        assert f"no running job '{cfg.job}'" in gone.stderr and "run directory" in gone.stderr
    finally:
        job.join(timeout=300)
        cluster.shutdown()
