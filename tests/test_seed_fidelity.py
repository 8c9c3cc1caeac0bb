"""Seed fidelity: the seed's own run, every picture, surge-collapse events in the history,
and using the trained ensemble (eval, predict)."""

import csv
import json
import os

import numpy as np
import pytest

from ensemble.api import History
from ensemble.config import load_config
from ensemble.data.datasets import load_dataset
from ensemble.outputs.inference import Ensemble
from ensemble.outputs.plots import plot_all
from ensemble.runtime.driver import run_job
from tests.conftest import TINY, cli

pytestmark = pytest.mark.ray
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny real job with entropy-driven surge-collapse on."""
    run_dir = tmp_path_factory.mktemp("fidelity") / "run"
    cfg = load_config(
        None,
        TINY
        + [
            "job=fidelity",
            "train.epochs=3",
            "dynamics.mode=entropy",
            "dynamics.cooldown=5",
            "dynamics.high_entropy=0.6",
            "dynamics.low_entropy=0.1",
        ],
    )
    run_job(cfg, run_dir)
    return run_dir


def test_every_plot_is_a_valid_png_from_the_history(finished_run):
    made = plot_all(History.open(finished_run), finished_run / "plots", animate=True)
    names = {p.name for p in made}
    assert {
        "dynamics_3d.png",
        "orbits.png",
        "lineage.png",
        "curves.png",
        "entropy_sparsity.png",
        "compat_fc1.png",
        "compat_fc2.png",
        "compat_out.png",
        "orbits.gif",
    } <= names
    for p in made:
        data = p.read_bytes()
        assert len(data) > 2000, p
        assert data.startswith(PNG) if p.suffix == ".png" else data.startswith(b"GIF8")


def test_surge_collapse_events_carry_their_entropy(finished_run):
    h = History.open(finished_run)
    events = [e for e in h.events() if e.kind in ("collapse", "energy", "input_noise", "surge")]
    assert events, "entropy mode took no action in 3 epochs"
    for e in events:
        assert e.model in range(4) and len(e.detail["entropy"]) == 2  # two hidden layers
    for e in h.events(kind="collapse"):
        assert set(e.detail["sparsity"]) == {"fc1", "fc2", "out"}
    assert any(p.entropy is not None for p in h.publications())


def test_eval_and_predict_round_trip(finished_run, tmp_path):
    ens = Ensemble.load(finished_run)
    report = ens.evaluate()
    cfg = load_config(finished_run / "config.yaml")
    data = load_dataset(cfg.data, cfg.seed)
    raw = data.x_test * ens.std + ens.mean  # what a user would hold: unstandardised digits
    probs = ens.predict_proba(raw)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert abs((probs.argmax(1) == data.y_test).mean() - report["ensemble"]["accuracy"]) < 1e-9
    summary = json.loads((finished_run / "summary.json").read_text())
    assert report["ensemble"]["accuracy"] == pytest.approx(summary["ensemble"]["accuracy"])
    assert 0 <= report["disagreement"] <= 1 and report["pairwise_kl"] >= 0

    np.save(tmp_path / "x.npy", raw)
    np.savetxt(tmp_path / "x.csv", raw[:5], delimiter=",")
    out = tmp_path / "y.csv"
    proc = cli(
        "predict", str(finished_run), "--input", str(tmp_path / "x.npy"), "--output", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [int(r["label"]) for r in rows] == list(probs.argmax(1))
    assert all(abs(sum(float(r[f"p{c}"]) for c in range(10)) - 1) < 1e-4 for r in rows)
    assert (
        cli(
            "predict", str(finished_run), "--input", str(tmp_path / "x.csv"), "--output", str(out)
        ).returncode
        == 0
    )
    evaluated = json.loads(cli("eval", str(finished_run), "--json").stdout)
    assert evaluated["ensemble"]["accuracy"] == pytest.approx(report["ensemble"]["accuracy"])


def test_predict_rejects_wrong_width(finished_run, tmp_path):
    np.save(tmp_path / "narrow.npy", np.zeros((3, 10)))
    proc = cli(
        "predict",
        str(finished_run),
        "--input",
        str(tmp_path / "narrow.npy"),
        "--output",
        str(tmp_path / "y.csv"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "rows have 10 values, the ensemble expects 64 features" in " ".join(proc.stderr.split())
    (tmp_path / "bad.csv").write_text("1,2,x\n")
    proc = cli(
        "predict",
        str(finished_run),
        "--input",
        str(tmp_path / "bad.csv"),
        "--output",
        str(tmp_path / "y.csv"),
    )
    assert proc.returncode == 2 and "not a numeric table" in proc.stderr


def test_seed_config_runs_and_merges_with_its_external_tether(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(
        os.path.join(repo, "configs", "seed.yaml"), ["train.epochs=2", "job=seed-test"]
    )
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the seed writes its three files where it runs
    try:
        summary = run_job(cfg, tmp_path / "run")
    finally:
        os.chdir(cwd)
    for f in ("data_input.txt", "labels_input.txt", "tether_other_model.txt"):
        assert (tmp_path / f).is_file()
    assert len((tmp_path / "tether_other_model.txt").read_text().split()) == 64 * 64
    h = History.open(tmp_path / "run")
    merges = h.merges()
    assert summary["merges"] == len(merges) == 10  # 5 an epoch, the seed's cap, 2 epochs
    assert all(d.layer == "fc2" and d.partner == 1 and d.compat > 50 for d in merges)
    assert h.decisions(kind="drift") == []
    made = plot_all(h, tmp_path / "run" / "plots")
    assert (tmp_path / "run" / "plots" / "dynamics_3d.png") in made
