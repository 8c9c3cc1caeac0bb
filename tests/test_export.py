"""`ensemble export`: members (tethers folded) and the soup, for plain PyTorch."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.config import load_config
from ensemble.data.datasets import load_dataset
from ensemble.outputs.export import soup
from ensemble.outputs.inference import Ensemble
from ensemble.runtime.job import run_local
from tests.conftest import tiny

runner = CliRunner()

# A user's script: the package cannot be imported, only torch, safetensors and the files.
PLAIN_TORCH = r"""
import json, sys
sys.modules["ensemble"] = None  # any import of this package fails
import numpy as np, torch
from safetensors.torch import load_file

m = json.load(open("manifest.json"))
x = torch.from_numpy(np.load("x.npy"))
probs = []
for f in m["files"]:
    net = torch.nn.Sequential()
    for i, (name, a, b) in enumerate(zip(m["layers"], m["sizes"], m["sizes"][1:])):
        net.add_module(name, torch.nn.Linear(a, b))
        if i < len(m["layers"]) - 1:
            net.add_module(f"relu{i + 1}", torch.nn.ReLU())
    net.load_state_dict(load_file(f))
    pre = load_file("preprocess.safetensors")
    xs = (x - pre["mean"]) / pre["std"] if pre else x
    with torch.no_grad():
        probs.append(torch.softmax(net(xs), dim=1).numpy())
np.save("probs.npy", np.mean(probs, 0))
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Independent members (different inits): the soup has to align them."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(None, tiny("job=exp", "policy.name=none", "model.layers=[24]"))
    run_local(cfg, run_dir)
    return run_dir


def test_exported_members_predict_as_the_ensemble_without_this_package(finished, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["export", str(finished), "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == [f"model_{i}.safetensors" for i in range(4)]
    for f in manifest["files"]:  # tethers folded: only the module's own keys
        assert not any(k.startswith("tether") for k in load_file(str(out / f)))
    x = load_digits().data[:50].astype(np.float32)  # raw inputs, as a user has them
    np.save(out / "x.npy", x)
    (out / "user.py").write_text(PLAIN_TORCH)
    proc = subprocess.run(
        [sys.executable, "user.py"], cwd=out, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    want = Ensemble.load(finished).predict_proba(x)
    np.testing.assert_allclose(np.load(out / "probs.npy"), want, atol=1e-5)


def test_the_soup_is_at_least_the_best_member_on_validation(finished, tmp_path):
    out = tmp_path / "soup"
    res = runner.invoke(app, ["export", str(finished), "--out", str(out), "--soup"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "soup.json").read_text())
    assert "best member" in res.output and "ensemble" in res.output
    assert report["soup"]["val"]["accuracy"] >= report["best_member"]["val"]["accuracy"]
    assert report["soup"]["val"]["nll"] <= report["best_member"]["val"]["nll"]
    assert report["soup"]["members"][0] == report["best_member"]["model"]
    assert {"accuracy", "nll"} <= set(report["ensemble"]["test"])
    weights = load_file(str(out / "soup.safetensors"))
    assert json.loads((out / "manifest.json").read_text())["files"] == ["soup.safetensors"]
    # one member's soup is that member, folded
    cfg = load_config(finished / "config.yaml", saved=True)
    data = load_dataset(cfg.data, cfg.seed)
    best = report["best_member"]["model"]
    member = load_file(str(finished / "models" / f"model_{best}.safetensors"))
    alone = soup(cfg, data, {best: member})
    assert alone.members == [best] and set(alone.weights) == set(weights)
    np.testing.assert_allclose(
        alone.weights["fc1.weight"], member["fc1.weight"] * member["tether.fc1"]
    )


def test_a_uniform_soup_of_one_members_permuted_copies_is_that_member(finished):
    """Alignment works: copies of a member with hidden units shuffled average back to it."""
    cfg = load_config(finished / "config.yaml", saved=True)
    data = load_dataset(cfg.data, cfg.seed)
    member = load_file(str(finished / "models" / "model_0.safetensors"))
    rng = np.random.default_rng(0)
    copies = {0: member}
    for m in (1, 2):
        p = rng.permutation(24)
        c = dict(member)
        for k in ("fc1.weight", "tether.fc1"):
            c[k] = member[k][p]
        c["fc1.bias"], c["out.weight"] = member["fc1.bias"][p], member["out.weight"][:, p]
        c["tether.out"] = member["tether.out"][:, p]
        copies[m] = c
    s = soup(cfg, data, copies, greedy=False)
    np.testing.assert_allclose(
        s.weights["fc1.weight"], member["fc1.weight"] * member["tether.fc1"], atol=1e-6
    )
    s_unaligned = soup(cfg, data, copies, greedy=False, aligned=False)
    assert not np.allclose(s_unaligned.weights["fc1.weight"], s.weights["fc1.weight"], atol=1e-3)


def test_export_errors_leave_nothing(finished, tmp_path):
    unfinished = tmp_path / "unfinished"
    (unfinished / "models").mkdir(parents=True)
    for f in ("config.yaml", "history.sqlite"):  # a job that stopped before its end
        (unfinished / f).write_bytes((finished / f).read_bytes())
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for args, msg in [
        ([str(unfinished), "--out", str(tmp_path / "o1")], "no trained models"),
        ([str(finished), "--out", str(a_file)], "exists and is not a directory"),
    ]:
        res = runner.invoke(app, ["export", *args])
        assert res.exit_code == 2 and msg in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o1").exists() and a_file.read_text() == "x"
