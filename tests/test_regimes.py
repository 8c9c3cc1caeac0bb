"""Populations whose members differ, through the CLI on Ray as a user types them, against
the same population trained in one process: the regime is real, and each policy does what
its name says there."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ensemble.config import load_config
from ensemble.outputs.export import folded
from ensemble.runtime.job import run_local
from tests.conftest import cli

pytestmark = pytest.mark.ray

LABELS = ["data.groups=4", "data.shift=permute_labels", "data.partition=shard"]
ROOT = Path(__file__).resolve().parents[1]


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_groups_with_their_own_labels_run_on_ray_and_defeat_one_global_model(tmp_path):
    """Conflicting label maps: one global model (FedAvg) cannot serve them, so it scores a
    worse personal NLL than members trained alone."""
    short = ["train.epochs=6", "job=labels"]
    proc = cli("run", *sets(*LABELS, *short), "--run-dir", str(tmp_path / "ray"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert s["groups"]["true"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert {"accuracy", "nll"} <= set(s["personal"]) and s["differ"] is True
    assert all("personal_nll" in m and m["group"] == m["model"] // 2 for m in s["members"])
    assert "personal" in proc.stdout and "global" in proc.stdout  # which score is which
    runs = {}
    for name in ("fedavg", "none"):
        cfg = load_config(None, [*LABELS, "train.epochs=10", f"job={name}", f"policy.name={name}"])
        runs[name] = run_local(cfg, tmp_path / name)
    assert runs["fedavg"]["merges"] > 0 and runs["none"]["merges"] == 0
    assert runs["fedavg"]["personal"]["nll"] > runs["none"]["personal"]["nll"]


def test_fedavg_by_name_on_label_skew_merges_ends_equal_and_beats_local_only(tmp_path):
    """`--set policy.name=fedavg` is FedAvg (shared init, no guard, no alignment): its merges
    are kept, its members end equal, and its ensemble beats local-only's by 2x in NLL."""
    skew = ["data.partition=dirichlet", "data.alpha=0.3", "job=skew"]
    run = tmp_path / "fedavg"
    plain = str(ROOT / "configs" / "all-data.yaml")  # digits, one distribution (no sites)
    proc = cli("run", plain, *sets(*skew, "policy.name=fedavg"), "--run-dir", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["merges"] > 0 and s["rejected"] == 0 and s["merges"] == s["merges_attempted"]
    members = [folded(load_file(str(run / "models" / f"model_{m}.safetensors"))) for m in range(8)]
    for m in members[1:]:
        for key, value in m.items():
            np.testing.assert_allclose(value, members[0][key], rtol=1e-4, atol=1e-5)
    alone = run_local(load_config(plain, [*skew, "policy.name=none"]), tmp_path / "none")
    assert s["ensemble"]["nll"] * 2 <= alone["ensemble"]["nll"], (s["ensemble"], alone["ensemble"])


def test_the_default_job_merges_drifts_and_beats_local_only_and_fedavg(tmp_path):
    """`ensemble run`, nothing else typed: the four-site scenario on Ray. Gravity merges,
    cuts the edges between sites, finds them, and each member's score on its own site
    beats training alone and one global model."""
    from ensemble.jobs import DEFAULT

    proc = cli("run", "--set", "job=default-job", "--run-dir", str(tmp_path / "ray"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert s["policy"] == "gravity" and s["merges"] > 0 and s["drifts"] > 0
    assert s["groups"]["ari"] == 1.0 and s["groups"]["found"] == s["groups"]["true"]
    others = {}
    for name in ("none", "fedavg"):
        cfg = load_config(DEFAULT, [f"job={name}", f"policy.name={name}"])
        others[name] = run_local(cfg, tmp_path / name)["personal"]["nll"]
    assert s["personal"]["nll"] < others["none"] and s["personal"]["nll"] < others["fedavg"]
    assert "groups found: 4" in proc.stdout and "drifts 48" in proc.stdout
