"""Merging toward the population: fedavg, mean, what a merge shares, and data partitions."""

import numpy as np
import pytest
import torch

from ensemble.config import load_config
from ensemble.errors import ConfigError
from ensemble.runtime.job import drive, load, prepare
from tests.conftest import tiny
from tests.helpers import assert_bank_matches, coordinator, publish, tethers_of, trainer

# plain federated averaging from one shared init: every member exactly the mean each round
FEDAVG = ("policy.name=fedavg", "model.init=shared", "policy.align=false", "policy.share=both")


def cfg(tmp_path, *extra):
    return load_config(None, tiny(f"job=p-{tmp_path.name}", *extra))


def one_round(tmp_path, *extra):
    """Four trained models, one round of the policy, its mail applied."""
    prep = prepare(cfg(tmp_path, "models.count=4", *extra))
    t = trainer(prep, range(4))
    t.train_window()  # models that differ
    c = coordinator(prep, tmp_path)
    before = {n: t.stack.weight(n).detach().clone() for n in t.layers}
    tethers = [tethers_of(t, i) for i in range(4)]
    reply = c.exchange(publish(t))
    t.receive(reply)
    return c, t, before, tethers, reply


def test_a_fedavg_round_leaves_every_member_equal(tmp_path):
    c, t, before, tethers, reply = one_round(tmp_path, *FEDAVG)
    assert {(i.kind, i.group) for i in reply.instructions} == {("merge", (0, 1, 2, 3))}
    assert len(reply.instructions) == 4 * len(t.layers)  # every model, every layer
    for n in t.layers:
        eff = (t.stack.weight(n) * t.stack.tethers[n]).detach()
        for i in range(1, 4):  # W * T and the tethers: the same for all
            torch.testing.assert_close(eff[i], eff[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(t.stack.tethers[n][i], t.stack.tethers[n][0])
        mean = np.mean([before[n][i].numpy() * tethers[i][n] for i in range(4)], 0)
        np.testing.assert_allclose(eff[0].numpy(), mean, rtol=1e-4, atol=1e-5)  # their mean
    assert_bank_matches(c, [t])


def test_fedavg_momentum_carries_the_target_on_along_its_last_move(tmp_path):
    beta = 0.5
    prep = prepare(
        cfg(
            tmp_path,
            *FEDAVG,
            f"policy.momentum={beta}",
        )
    )
    t, c = trainer(prep, range(4)), coordinator(prep, tmp_path)

    def eff():  # every member's tethered weights W * T, layer -> (4, ...)
        return {
            n: (t.stack.weight(n) * t.stack.tethers[n]).detach().numpy().copy() for n in t.layers
        }

    means, targets = [], []
    for _ in range(3):
        t.train_window()  # the weights train: each round's mean differs
        means.append({n: w.mean(0) for n, w in eff().items()})
        t.receive(c.exchange(publish(t)))
        after = eff()
        for n in t.layers:  # still one target for all
            np.testing.assert_allclose(
                after[n], np.broadcast_to(after[n][0], after[n].shape), atol=1e-6
            )
        targets.append({n: w[0] for n, w in after.items()})
    for n in t.layers:
        # no velocity yet: the first two targets are the means
        np.testing.assert_allclose(targets[0][n], means[0][n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(targets[1][n], means[1][n], rtol=1e-5, atol=1e-6)
        # then v = g1 - mean2 (g1 = mean1, the last target), and the target is mean3 - beta v
        moved = np.abs(means[1][n] - means[0][n]).max()
        want = means[2][n] + beta * (means[1][n] - means[0][n])
        np.testing.assert_allclose(targets[2][n], want, rtol=0, atol=0.01 * moved)
        assert np.abs(targets[2][n] - means[2][n]).max() > 0.4 * beta * moved > 0  # carried on
    assert_bank_matches(c, [t])


def test_momentum_is_fedavgs_alone():
    with pytest.raises(ConfigError, match=r"policy 'mean' takes no key 'momentum'"):
        load(None, ["policy.name=mean", "policy.momentum=0.5"])


def test_mean_moves_each_member_part_of_the_way(tmp_path):
    c, t, _, tethers, _ = one_round(
        tmp_path,
        "policy.name=mean",
        "policy.alpha=0.25",
        "model.init=shared",
        "policy.align=false",
        "policy.share=tethers",
    )
    for n in t.layers:
        mean = np.mean([x[n] for x in tethers], 0)
        for i in range(4):
            want = 0.75 * tethers[i][n] + 0.25 * mean
            np.testing.assert_allclose(tethers_of(t, i)[n], want, rtol=1e-5, atol=1e-6)
    assert_bank_matches(c, [t])


def test_sharing_weights_keeps_each_members_own_tether(tmp_path):
    c, t, before, tethers, _ = one_round(
        tmp_path,
        "policy.name=fedavg",
        "model.init=shared",
        "policy.align=false",
        "policy.share=weights",
    )
    for n in t.layers:
        w = t.stack.weight(n).detach()
        for i in range(4):
            np.testing.assert_array_equal(tethers_of(t, i)[n], tethers[i][n])  # personal
            torch.testing.assert_close(w[i], before[n].mean(0), rtol=1e-5, atol=1e-6)
    assert_bank_matches(c, [t])


def test_an_aligned_population_mean_of_permuted_copies_keeps_their_function(tmp_path):
    from tests.test_merging import copy_permuted

    prep = prepare(
        cfg(
            tmp_path,
            "models.count=2",
            "policy.name=fedavg",
            "policy.align=true",
            "policy.share=both",
            "policy.guard=false",
        )
    )
    t = trainer(prep, [0, 1])
    rng = np.random.default_rng(0)
    copy_permuted(t, 0, 1, [rng.permutation(16), rng.permutation(16)])
    before = t.predict_proba(prep.data.x_test)
    c = coordinator(prep, tmp_path)
    t.receive(c.exchange(publish(t)))
    np.testing.assert_allclose(t.predict_proba(prep.data.x_test), before, atol=1e-5)
    assert_bank_matches(c, [t])


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3]], [[0, 2], [1, 3]]])
def test_a_fedavg_job_ends_on_a_round_with_every_member_equal(tmp_path, groups):
    prep = prepare(
        cfg(
            tmp_path,
            *FEDAVG,
            "data.partition=shard",
            "coordinator.round_every=100000",  # no round but the job's last
        )
    )
    c = coordinator(prep, tmp_path)
    ts = [trainer(prep, g) for g in groups]
    drive(ts, c)
    c.history.close()
    assert c.rounds == 1 and c.merges > 0 and c.rejected == 0
    assert_bank_matches(c, ts)
    probs = np.stack([p for t in ts for p in t.predict_proba(prep.data.x_test)])
    # the job's last round came after every member's last step: one model, four copies
    np.testing.assert_allclose(probs, np.broadcast_to(probs[0], probs.shape), atol=1e-5)


def test_a_dirichlet_partition_with_a_tiny_alpha_gives_each_member_few_classes(tmp_path):
    few = prepare(cfg(tmp_path, "models.count=8", "data.partition=dirichlet", "data.alpha=0.05"))
    many = prepare(cfg(tmp_path, "models.count=8", "data.partition=dirichlet", "data.alpha=100"))
    y = few.data.y_train

    def classes(p, share):  # per member: the classes that hold `share` of its rows or more
        return [
            int((np.bincount(y[r], minlength=10) / len(r) >= share).sum()) for r in p.parts.train
        ]

    assert np.mean(classes(few, 0.1)) <= 2.5  # label skew: a class or two each
    assert min(classes(many, 0.05)) == 10  # nearly uniform: every class, in earnest
    for p in (few, many):  # disjoint shards that cover the training split; val rows too
        rows = np.concatenate(p.parts.train)
        assert len(rows) == len(set(rows)) == len(y)
        assert len(np.concatenate(p.parts.val)) == len(p.data.y_val)
        for tr, va in zip(p.parts.train, p.parts.val, strict=True):  # val follows the skew
            assert set(np.unique(p.data.y_val[va])) <= set(np.unique(y[tr])) | set(range(10))
    again = prepare(cfg(tmp_path, "models.count=8", "data.partition=dirichlet", "data.alpha=0.05"))
    for a, b in zip(few.parts.train, again.parts.train, strict=True):  # seeded
        np.testing.assert_array_equal(a, b)


def test_shard_gives_disjoint_equal_slices_and_members_validate_on_their_own(tmp_path):
    prep = prepare(cfg(tmp_path, "data.partition=shard"))
    sizes = [len(r) for r in prep.parts.train]
    assert max(sizes) - min(sizes) <= 1 and not prep.parts.whole
    t = trainer(prep, range(4))
    assert t.own_val is not None
    own = t.evaluate_own_val()
    for i in range(4):  # each model's own rows, not the whole split
        x = prep.data.x_val[prep.parts.val[i]]
        logits = t.stack.forward(torch.as_tensor(x), shared=True)[i]
        y = torch.as_tensor(prep.data.y_val[prep.parts.val[i]])
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        assert own[i, 0] == pytest.approx(loss, rel=1e-5)


def test_the_old_shard_key_points_to_the_new_one():
    with pytest.raises(ConfigError, match="data.shard was replaced by data.partition"):
        load_config(None, ["data.shard=true"])
    with pytest.raises(ConfigError, match="policy.merge was replaced by policy.share"):
        load_config(None, ["policy.merge=weights"])


def test_the_guards_verdicts_on_the_last_round_reach_the_history(tmp_path):
    """Merges given in the job's last round, after every model's last step, are still
    judged by the guard, and what it undid is reported: the counts add up."""
    from ensemble.history import HistoryReader

    prep = prepare(
        cfg(
            tmp_path,
            "policy.name=threshold",
            "policy.merge_above=-10",  # every pair is compatible: merges to judge
            "policy.drift_below=-20",
            "policy.share=both",
            "policy.guard=true",
            "coordinator.round_every=100000",  # no round but the job's last
        )
    )
    c = coordinator(prep, tmp_path)
    ts = [trainer(prep, [0, 1]), trainer(prep, [2, 3])]
    drive(ts, c)
    c.history.close()
    h = HistoryReader(tmp_path / "history.sqlite")
    assert c.rounds == 1 and c.merges > 0
    undone = int(sum(t.rejected.sum() for t in ts))
    assert undone > 0  # unaligned weight merges of independent nets: the guard undoes some
    assert c.rejected == undone == len(h.events("rejected"))
    assert c.progress()["staleness"]["applied"] == h.count("instructions")
    assert_bank_matches(c, ts)
