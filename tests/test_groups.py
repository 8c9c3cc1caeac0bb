"""Members that differ: groups and their shifts, each member's own test rows, personal
scores, and the group policies (FedAvg within groups, FedAMP) on such populations."""

import json

import numpy as np
import pytest
import torch

from ensemble.config import dump_config, load_config
from ensemble.data.datasets import load_dataset
from ensemble.data.groups import group_of, true_groups
from ensemble.errors import ConfigError, DataError
from ensemble.outputs.inference import Ensemble
from ensemble.runtime.job import drive, finish, prepare, run_local
from tests.conftest import tiny
from tests.helpers import coordinator, publish, trainer

GROUPED = ["models.count=4", "data.groups=2", "data.partition=shard", "train.epochs=1"]


def cfg(tmp_path, *extra):
    return load_config(None, tiny(f"job=g-{tmp_path.name}", *GROUPED, *extra))


def test_members_are_dealt_to_groups_in_blocks():
    assert [group_of(m, 4, 8) for m in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert true_groups(6, 3) == [[0, 1], [2, 3], [4, 5]] and true_groups(6, 1) is None


@pytest.mark.parametrize("shift", ["rotate", "permute_labels", "permute_features"])
def test_each_member_trains_validates_and_is_tested_on_its_groups_view(tmp_path, shift):
    prep = prepare(cfg(tmp_path, f"data.shift={shift}", "policy.name=none"))
    base = load_dataset(prep.cfg.data, prep.cfg.seed)  # the data as loaded: group 0's view
    n_train, n_val, n_test = base.sizes()
    views = 0
    for m in range(4):
        g = group_of(m, 2, 4)
        for split, n, rows in (
            ("train", n_train, prep.parts.train[m]),
            ("val", n_val, prep.parts.val[m]),
            ("test", n_test, prep.parts.test[m]),
        ):
            assert ((rows >= g * n) & (rows < (g + 1) * n)).all()  # its own group's block
            x, y = getattr(prep.data, f"x_{split}"), getattr(prep.data, f"y_{split}")
            bx, by = getattr(base, f"x_{split}"), getattr(base, f"y_{split}")
            own = rows - g * n
            np.testing.assert_array_equal(x[rows], prep.shift.x(bx, g)[own])
            np.testing.assert_array_equal(y[rows], prep.shift.y(by, g)[own])
        changed = not np.array_equal(prep.shift.x(base.x_test, g), base.x_test) or not (
            np.array_equal(prep.shift.y(base.y_test, g), base.y_test)
        )
        views += changed
    assert views == 2  # group 1's two members see different data than group 0's


@pytest.mark.parametrize("shift", ["rotate", "permute_labels", "permute_features"])
def test_a_shift_is_applied_alike_at_train_test_and_predict_time(tmp_path, shift):
    """The job's personal scores (from what the trainer saw), `ensemble eval`'s (rebuilt
    from the config) and `predict --member` on the data as loaded agree."""
    c = cfg(tmp_path, f"data.shift={shift}", "policy.name=none")
    summary = run_local(c, tmp_path / "run")
    ens = Ensemble.load(tmp_path / "run")
    report = ens.evaluate()
    for got, want in zip(report["members"], summary["members"], strict=True):
        assert got["model"] == want["model"]
        assert got["personal_nll"] == pytest.approx(want["personal_nll"], abs=1e-5)
        assert got["nll"] == pytest.approx(want["nll"], abs=1e-5)
    prep = prepare(c)
    base = load_dataset(prep.cfg.data, prep.cfg.seed)
    raw = base.x_test * ens.std + ens.mean  # what a user has: inputs before standardising
    n = len(base.y_test)
    for m in range(4):
        g = group_of(m, 2, 4)
        mine = ens.predict_proba(raw, member=m, alone=True)
        view = torch.from_numpy(prep.data.x_test[g * n : (g + 1) * n])
        with torch.no_grad():
            want = torch.softmax(ens.members[m](view), 1).numpy()
        np.testing.assert_allclose(mine, want, atol=1e-5)
        own = prep.parts.test[m] - g * n  # and its personal score is on its group's labels
        acc = (mine[own].argmax(1) == prep.shift.y(base.y_test, g)[own]).mean()
        assert acc == pytest.approx(summary["members"][m]["personal_accuracy"], abs=1e-9)


def test_a_shift_needs_groups_and_a_rotation_needs_images(tmp_path):
    with pytest.raises(ConfigError, match="data.shift rotate: .*set data.groups >= 2"):
        load_config(None, ["data.shift=rotate"])
    with pytest.raises(ConfigError, match=r"data.groups \(9\) must be at most models.count"):
        load_config(None, ["data.groups=9"])
    with pytest.raises(DataError, match="data.shift rotate: the data .* are not images"):
        prepare(cfg(tmp_path, "data.name=wine", "data.shift=rotate"))
    with pytest.raises(DataError, match=r"data.image_shape \[4, 16\]: expected square images"):
        prepare(cfg(tmp_path, "data.shift=rotate", "data.image_shape=[4, 16]"))


def test_the_summary_scores_members_globally_and_on_their_own_data(tmp_path):
    over = ["data.shift=permute_labels", "policy.name=none", "train.epochs=8"]
    s = run_local(cfg(tmp_path, *over), tmp_path / "r")
    assert s["groups"]["true"] == [[0, 1], [2, 3]] and s["differ"] is True
    assert [m["model"] for m in s["members"]] == [0, 1, 2, 3]
    assert [m["group"] for m in s["members"]] == [0, 0, 1, 1]
    for key in ("accuracy", "nll"):
        own = [m[f"personal_{key}"] for m in s["members"]]
        assert s["personal"][key] == pytest.approx(np.mean(own))
    # conflicting label maps: a member is much better on its own labels than on everyone's
    assert s["personal"]["accuracy"] > s["mean_member"]["accuracy"] + 0.2
    on_disk = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert on_disk["personal"] == s["personal"]


def test_fedavg_within_the_data_groups_is_the_oracle(tmp_path):
    over = ["models.count=4", "data.shift=permute_labels", "policy.name=fedavg"]
    prep = prepare(cfg(tmp_path, *over, "policy.within=groups"))
    t, c = trainer(prep, range(4)), coordinator(prep, tmp_path)
    t.train_window()
    reply = c.exchange(publish(t))
    assert {(i.model, i.group) for i in reply.instructions} == {
        (0, (0, 1)),
        (1, (0, 1)),
        (2, (2, 3)),
        (3, (2, 3)),
    }
    t.receive(reply)
    w = t.stack.weight("fc1") * t.stack.tethers["fc1"]
    assert torch.allclose(w[0], w[1], atol=1e-6) and torch.allclose(w[2], w[3], atol=1e-6)
    assert not torch.allclose(w[0], w[2], atol=1e-3)
    assert c.groups == [[0, 1], [2, 3]]


def test_fedamp_gives_each_member_its_own_attention_weighted_target(tmp_path):
    prep = prepare(cfg(tmp_path, "policy.name=fedamp", "policy.sigma=5", "policy.self_weight=0.5"))
    t, c = trainer(prep, range(4)), coordinator(prep, tmp_path)
    t.train_window()
    before = {n: (t.stack.weight(n) * t.stack.tethers[n]).detach().numpy().copy() for n in t.layers}
    reply = c.exchange(publish(t))
    flat = np.concatenate([before[n].reshape(4, -1) for n in t.layers], 1).astype(np.float64)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    cos = unit @ unit.T
    t.receive(reply)
    for ins in reply.instructions:
        i = ins.model
        others = [j for j in range(4) if j != i]
        xi = np.exp(5 * cos[i, others])
        xi = 0.5 * xi / xi.sum()  # the others share what the member keeps not of itself
        want = dict(zip([i, *others], [0.5, *xi], strict=True))
        assert dict(zip(ins.group, ins.weights, strict=True)) == pytest.approx(want, rel=1e-4)
        target = sum(want[j] * before[ins.layer][j] for j in range(4))
        got = (t.stack.weight(ins.layer)[i] * t.stack.tethers[ins.layer][i]).detach().numpy()
        np.testing.assert_allclose(got, target, rtol=1e-4, atol=1e-5)
    assert len(reply.instructions) == 4 * len(t.layers)


def test_fedavgs_momentum_survives_a_coordinator_restart(tmp_path):
    """A restarted coordinator (or a resumed job) carries on with the momentum the policy
    had: its state is in the history, saved with every round."""
    over = ["policy.name=fedavg", "policy.momentum=0.5", "models.count=4"]
    prep = prepare(load_config(None, tiny(f"job=m-{tmp_path.name}", *over)))
    t, c = trainer(prep, range(4)), coordinator(prep, tmp_path)
    for _ in range(2):
        t.train_window()
        t.receive(c.exchange(publish(t)))
    kept = c.policy.state()
    assert kept and any(np.abs(v).sum() > 0 for k, v in kept.items() if "/velocity/" in k)
    c.history.close()  # the coordinator dies
    back = coordinator(prep, tmp_path, restore=True)
    got = back.policy.state()
    assert got.keys() == kept.keys()
    for k in kept:
        np.testing.assert_array_equal(got[k], kept[k])
    (tmp_path / "fresh").mkdir()
    fresh = coordinator(prep, tmp_path / "fresh")  # without the history: no momentum
    assert fresh.policy.state() == {}


def test_explain_and_lineage_name_a_fedavg_merges_group(tmp_path):
    from typer.testing import CliRunner

    from ensemble.cli import app

    run = tmp_path / "run"
    run_local(load_config(None, tiny("job=fa", "policy.name=fedavg", "train.epochs=1")), run)
    runner = CliRunner()
    listed = runner.invoke(app, ["history", str(run), "--json"])
    first = json.loads(listed.output)[0]
    assert first["group"] == [0, 1, 2, 3] and first["partner"] is None
    out = runner.invoke(app, ["history", str(run), "--explain", str(first["id"])])
    assert out.exit_code == 0, out.output
    assert "toward the mean of group of 4: 0, 1, 2, 3" in out.output
    assert "away from all the others" not in out.output
    table = runner.invoke(app, ["history", str(run), "--kind", "merge"], env={"COLUMNS": "300"})
    assert "→ group of 4: 0, 1, 2, 3" in table.output
    lin = runner.invoke(app, ["lineage", str(run), "--model", "0", "--json"])
    edges = json.loads(lin.output)["edges"]
    partners = {e["partner"] for e in edges if e["model"] == 0}
    assert partners == {1, 2, 3}  # the group's members
    assert -1 not in {e["partner"] for e in edges} | {e["model"] for e in edges}  # no model -1
    groups = runner.invoke(app, ["history", str(run), "--groups", "--json"])
    assert all(r["groups"] == [[0, 1, 2, 3]] for r in json.loads(groups.output))


def test_eval_names_members_by_id_after_a_member_failed(tmp_path):
    from tests.test_faults import poison_at

    c = load_config(
        None, tiny("job=fail", "policy.name=none", "faults.on_poison=stop", "train.epochs=2")
    )
    prep = prepare(c)
    trainers = [trainer(prep, [m], checkpoint_dir=tmp_path / "ck") for m in range(4)]
    poison_at(trainers[1], 1, 5)
    (tmp_path / "run").mkdir()
    coord = coordinator(prep, tmp_path / "run")
    drive(trainers, coord)
    results = [r for t in trainers for r in t.results(0.0, 1.0)]
    summary = finish(prep, tmp_path / "run", results, coord.progress(), 1.0)
    coord.history.close()
    (tmp_path / "run" / "config.yaml").write_text(dump_config(prep.cfg))
    assert [f["model"] for f in summary["failed"]] == [1]
    report = Ensemble.load(tmp_path / "run").evaluate()
    assert [m["model"] for m in report["members"]] == [0, 2, 3]  # by id, not by position
    by_id = {m["model"]: m for m in summary["members"]}
    for m in report["members"]:
        assert m["nll"] == pytest.approx(by_id[m["model"]]["nll"], abs=1e-5)


def test_a_factory_with_no_arguments_trains(tmp_path):
    f = tmp_path / "nets.py"
    f.write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(),"
        " torch.nn.Linear(16, 10))\n"
        "def wide(width):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),"
        " torch.nn.Linear(width, 10))\n"
        "def deep(*, depth):\n"
        "    return make()\n"
    )
    s = run_local(load_config(None, tiny("job=z", f"model.factory={f}:make")), tmp_path / "a")
    assert s["ensemble"]["accuracy"] > 0.3
    over = [f"model.factory={f}:wide", "model.options={width: 8}"]
    s = run_local(load_config(None, tiny("job=w", *over)), tmp_path / "b")
    assert s["ensemble"]["accuracy"] > 0.3
    with pytest.raises(ConfigError, match=r"calling it as deep\(\) failed: TypeError.*depth"):
        prepare(load_config(None, tiny("job=x", f"model.factory={f}:deep")))
