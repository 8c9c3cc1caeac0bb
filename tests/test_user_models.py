"""Your own module: model.factory, tethers on Linear and Conv2d, alignment of conv
channels, and export into a fresh module of your factory."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ensemble import Job
from ensemble.cli import app
from ensemble.config import load_config
from ensemble.coordination.align import permute, weight_matching
from ensemble.errors import ConfigError
from ensemble.runtime.job import prepare
from ensemble.training.model import build_member, tethered_layers
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def user_cnn(tmp_path):
    """The example's CNN, copied to a file outside the repository."""
    dst = tmp_path / "elsewhere" / "my_cnn.py"
    dst.parent.mkdir()
    shutil.copy(ROOT / "examples" / "cnn_digits.py", dst)
    return dst


def cnn_cfg(path, tmp_path, *extra):
    return load_config(
        None,
        [
            *TINY,
            f"job=cnn-{tmp_path.name}",
            f"model.factory={path}:cnn",
            "model.options={channels: 4}",
            "policy.align=true",
            "policy.share=both",
            "policy.drift=repulsive",
            "compat.fn=cka",
            "policy.merge_above=0.5",
            "policy.drift_below=-0.5",
            *extra,
        ],
    )


def test_a_factory_cnn_gets_tethers_on_its_convolutions_and_its_linear(user_cnn, tmp_path):
    cfg = cnn_cfg(user_cnn, tmp_path)
    module, tethers = build_member(cfg, 64, 10, 0)
    assert list(tethers) == ["conv1", "conv2", "out"]
    assert tethers["conv1"].shape == module.conv1.weight.shape == (4, 1, 3, 3)
    again, _ = build_member(cfg, 64, 10, 0)  # seeded per member: the same init
    torch.testing.assert_close(again.conv1.weight, module.conv1.weight)
    other, _ = build_member(cfg, 64, 10, 1)
    assert not torch.equal(other.conv1.weight, module.conv1.weight)
    only = load_config(None, [f"model.factory={user_cnn}:cnn", "model.tethered=[Conv2d]"])
    assert list(build_member(only, 64, 10, 0)[1]) == ["conv1", "conv2"]
    assert tethered_layers(module, ["out"]) == ["out"]


def test_a_users_cnn_trains_with_merges_and_drifts_and_exports_to_plain_torch(user_cnn, tmp_path):
    run = tmp_path / "run"
    result = Job(cnn_cfg(user_cnn, tmp_path), run_dir=run).run(local=True)
    s = result.summary
    assert s["merges_attempted"] > 0 and s["drifts"] > 0, s
    kinds = {d.kind for d in result.history.decisions()}
    assert {"merge", "drift"} <= kinds
    out = tmp_path / "export"
    res = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["factory"].endswith("my_cnn.py:cnn") and manifest["options"] == {"channels": 4}
    # a user's script: fresh modules from the factory, the package unimportable
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.modules["ensemble"] = None
        sys.path.insert(0, {str(user_cnn.parent)!r})
        import numpy as np, torch
        from safetensors.torch import load_file
        from my_cnn import cnn
        m = json.load(open("manifest.json"))
        x = torch.from_numpy(np.load("x.npy"))
        probs = []
        for f in m["files"]:
            net = cnn(m["features"], m["classes"], **m["options"])
            net.load_state_dict(load_file(f))  # exactly the module's own keys
            with torch.no_grad():
                probs.append(torch.softmax(net(x), 1).numpy())
        np.save("probs.npy", np.mean(probs, 0))
        """
    )
    data = prepare(result.ensemble.cfg).data  # the job's test split, standardised
    np.save(out / "x.npy", data.x_test)
    (out / "user.py").write_text(script)
    proc = subprocess.run([sys.executable, "user.py"], cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    probs = np.load(out / "probs.npy")
    ens = result.ensemble  # the package's own members, tethers as parametrizations
    with torch.no_grad():
        x = torch.from_numpy(data.x_test)
        theirs = np.mean([torch.softmax(m(x), 1).numpy() for m in ens.members.values()], 0)
    np.testing.assert_allclose(probs, theirs, atol=1e-5)
    acc = (probs.argmax(1) == data.y_test).mean()
    reported = ens.evaluate()["ensemble"]["accuracy"]  # what `ensemble eval` says
    assert acc == pytest.approx(reported, abs=1e-9)
    assert set(load_file(str(out / "model_0.safetensors"))) == set(
        build_member(result.ensemble.cfg, 64, 10, 0)[0].state_dict()
    )


@pytest.mark.ray
def test_ensemble_run_trains_a_users_cnn_on_ray(user_cnn, tmp_path):
    from tests.conftest import cli

    config = tmp_path / "cnn.yaml"
    text = (ROOT / "configs" / "cnn-digits.yaml").read_text()
    config.write_text(text.replace("examples/cnn_digits.py:cnn", "elsewhere/my_cnn.py:cnn"))
    run = tmp_path / "run"
    sets = ["train.epochs=2", "models.count=3", "model.options={channels: 4}", "job=cnn-ray"]
    args = [a for o in sets for a in ("--set", o)]
    proc = cli("run", str(config), *args, "--run-dir", str(run), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["merges_attempted"] > 0 and summary["drifts"] > 0, summary
    saved = load_config(run / "config.yaml", saved=True)
    assert saved.model.factory == f"{user_cnn}:cnn"  # resolved where the job started


def test_alignment_undoes_a_permutation_of_conv_channels(user_cnn, tmp_path):
    cfg = cnn_cfg(user_cnn, tmp_path)
    module, _ = build_member(cfg, 64, 10, 0)
    names = ["conv1", "conv2", "out"]
    a = {
        n: (getattr(module, n).weight.detach().numpy(), getattr(module, n).bias.detach().numpy())
        for n in names
    }
    rng = np.random.default_rng(0)
    true = [rng.permutation(4), rng.permutation(8)]  # b's unit k is a's unit true[l][k]
    inv = [np.argsort(p) for p in true]
    b = {
        n: (permute(w, i, inv), permute(bias, i, inv)) for i, (n, (w, bias)) in enumerate(a.items())
    }
    perms = weight_matching(a, b)
    for i, n in enumerate(names):  # b aligned back is a
        np.testing.assert_allclose(permute(b[n][0], i, perms), a[n][0], atol=1e-6)
    x = torch.randn(5, 64)
    shuffled, _ = build_member(cfg, 64, 10, 0)
    with torch.no_grad():
        for n in names:
            getattr(shuffled, n).weight.copy_(torch.from_numpy(b[n][0]))
            getattr(shuffled, n).bias.copy_(torch.from_numpy(b[n][1]))
        torch.testing.assert_close(shuffled(x), module(x), atol=1e-5, rtol=1e-5)  # same function


@pytest.mark.parametrize(
    "body, message",
    [
        ("", "has no function 'make'"),
        (
            "def make(features, classes):\n    return 3\n",
            "returned int, expected a torch.nn.Module",
        ),
        (
            "def make(features, classes):\n    raise RuntimeError('boom')\n",
            "failed: RuntimeError: boom",
        ),
        (
            "import torch\ndef make(features, classes):\n    return torch.nn.Linear(features, 3)\n",
            "to (2, 3); expected (2, 10)",
        ),
        (
            "import torch\ndef make(features, classes):\n"
            "    return torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.BatchNorm1d(8),"
            " torch.nn.Linear(8, classes))\n",
            "has buffers",
        ),
        ("syntax error here\n", "importing"),
    ],
)
def test_a_bad_factory_names_itself_and_what_went_wrong(tmp_path, body, message):
    f = tmp_path / "fac.py"
    f.write_text(body)
    cfg = load_config(None, [*TINY, "job=bad", f"model.factory={f}:make"])
    with pytest.raises(ConfigError, match="model.factory") as e:
        prepare(cfg)
    assert message in str(e.value)


def test_factory_specs_are_checked_when_loaded(tmp_path):
    with pytest.raises(ConfigError, match="expected 'package.module:function'"):
        load_config(None, ["model.factory=no_colon"])
    with pytest.raises(ConfigError, match="no file"):
        prepare(load_config(None, [*TINY, "job=x", f"model.factory={tmp_path}/none.py:f"]))
    with pytest.raises(ConfigError, match="model.tethered"):
        prepare(load_config(None, [*TINY, "job=x", "model.tethered=[nothing]"]))
