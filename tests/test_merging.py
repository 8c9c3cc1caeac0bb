"""The options that give merging a chance, each on tiny inputs: alignment, weight merge,
function-space compatibility, the merge guard, repulsive drift and shared initialisation."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble import protocol
from ensemble.config import load_config
from ensemble.coordination import align, maths
from ensemble.errors import ConfigError
from ensemble.history import HistoryReader
from ensemble.protocol import Instruction, Rejection, Reply
from ensemble.runtime.job import load, prepare
from tests.conftest import cli, tiny
from tests.helpers import assert_bank_matches, coordinator, publish, tethers_of, trainer


def cfg_with(tmp_path, *extra):
    return load_config(None, tiny(f"job=m-{tmp_path.name}", *extra))


def random_params(rng, sizes):
    names = [f"fc{i + 1}" for i in range(len(sizes) - 2)] + ["out"]
    return {
        n: (rng.normal(size=(o, i)).astype(np.float32), rng.normal(size=o).astype(np.float32))
        for n, i, o in zip(names, sizes[:-1], sizes[1:], strict=True)
    }


def permuted(params, perms):
    return {
        n: tuple(align.permute(x, li, perms) for x in wb)
        for li, (n, wb) in enumerate(params.items())
    }


def test_weight_matching_recovers_a_known_permutation():
    rng = np.random.default_rng(0)
    a = random_params(rng, [10, 12, 9, 7, 3])
    q = [rng.permutation(h) for h in (12, 9, 7)]
    b = permuted(a, q)  # a with its hidden units shuffled
    perms = align.weight_matching(a, b)
    assert [p.tolist() for p in perms] == [p.tolist() for p in align.inverse(q)]
    back = permuted(b, perms)
    for n in a:
        np.testing.assert_array_equal(back[n][0], a[n][0])
        np.testing.assert_array_equal(back[n][1], a[n][1])


def test_weight_matching_survives_noise():
    rng = np.random.default_rng(1)
    a = random_params(rng, [20, 32, 32, 5])
    q = [rng.permutation(32) for _ in range(2)]
    noisy = {n: (w + 0.1 * rng.normal(size=w.shape), b) for n, (w, b) in a.items()}
    perms = align.weight_matching(a, permuted(noisy, q))
    assert [p.tolist() for p in perms] == [p.tolist() for p in align.inverse(q)]


def test_weight_matching_rejects_different_layers():
    rng = np.random.default_rng(2)
    a, b = random_params(rng, [4, 5, 3]), random_params(rng, [4, 5, 5, 3])
    with pytest.raises(ValueError, match="layers differ"):
        align.weight_matching(a, b)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_merge_weights_moves_the_tethered_weights_by_the_difference(alpha, seed):
    rng = np.random.default_rng(seed)
    w, t_old, pw = (rng.normal(size=(4, 3)) for _ in range(3))
    t_old = 1.0 + 0.1 * t_old
    t_new = 1.0 + 0.1 * rng.normal(size=(4, 3))
    got = protocol.merge_weights(w, t_old, t_new, pw - w * t_old, alpha)  # nothing trained since
    np.testing.assert_allclose(got * t_new, (1 - alpha) * w * t_old + alpha * pw, rtol=1e-9)


def test_merge_weights_keeps_w_where_the_tether_is_zero():
    w = np.ones((2, 2))
    t_new = np.array([[0.0, 1.0], [1.0, 1.0]])
    got = protocol.merge_weights(w, np.ones((2, 2)), t_new, np.full((2, 2), 2.0), 0.5)  # to 3
    assert got[0, 0] == 1.0 and got[0, 1] == 2.0


def copy_permuted(t, src: int, dst: int, perms):
    """Make row dst of stack t row src with hidden units shuffled: the same function."""
    rows = t.stack.rows(src)
    new = {}
    for li, n in enumerate(t.layers):
        for key in (f"{n}.weight", f"{n}.bias", f"tether.{n}"):
            new[key] = torch.from_numpy(align.permute(rows[key].numpy(), li, perms).copy())
    t.stack.set_rows(dst, new)


def pair_cfg(tmp_path, *extra):
    """Two models whose one pair merges at every round (raw compat above 0)."""
    return cfg_with(
        tmp_path,
        "models.count=2",
        "compat.normalize=none",
        "policy.merge_above=0.0",
        "policy.drift_below=-1.0",
        *extra,
    )


def merge_pair(tmp_path, *extra):
    """A stack of two, model 1 a permuted copy of model 0; one round that merges them."""
    prep = prepare(pair_cfg(tmp_path, *extra))
    t = trainer(prep, [0, 1])
    rng = np.random.default_rng(3)
    copy_permuted(t, 0, 1, [rng.permutation(16), rng.permutation(16)])
    before = t.predict_proba(prep.data.x_test)
    c = coordinator(prep, tmp_path)
    t.receive(c.exchange(publish(t)))
    return c, t, before, t.predict_proba(prep.data.x_test)


def test_aligned_weight_merge_of_a_permuted_copy_keeps_both_functions(tmp_path):
    c, t, before, after = merge_pair(tmp_path, "policy.align=true", "policy.share=both")
    assert c.merges == 2 * len(c.layers)  # every layer merged, on both sides
    np.testing.assert_allclose(after, before, atol=1e-5)
    for m in range(2):  # the coordinator's bank still equals what the model holds
        for n, arr in tethers_of(t, m).items():
            np.testing.assert_allclose(c.bank.row(m, n), arr, atol=1e-6)


def test_unaligned_weight_merge_of_a_permuted_copy_changes_the_function(tmp_path):
    c, _, before, after = merge_pair(tmp_path, "policy.share=both")
    assert c.merges == 2 * len(c.layers)
    assert np.abs(after - before).max() > 1e-2


def test_cka_is_linear_cka_and_ignores_unit_order():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 5))
    g = np.stack([maths.centered_gram(v).ravel() for v in (x, y, x[:, rng.permutation(8)])])
    cka = maths.cosine_from_gram(g.astype(np.float64) @ g.T.astype(np.float64))
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert cka[0, 1] == pytest.approx(expected, rel=1e-4)
    assert cka[0, 2] == pytest.approx(1.0, abs=1e-5)


def test_function_space_compat_finds_the_permuted_copy(tmp_path):
    prep = prepare(cfg_with(tmp_path, "compat.fn=cka", "compat.normalize=none"))
    t = trainer(prep, range(4))
    rng = np.random.default_rng(5)
    copy_permuted(t, 0, 1, [rng.permutation(16), rng.permutation(16)])
    c = coordinator(prep, tmp_path)
    c.receive(publish(t))  # no round: only the compatibility is looked at
    rows = np.arange(4)
    for layer in c.layers:
        cka, _ = c.layer_compat(layer, rows)
        assert cka[0, 1] == pytest.approx(1.0, abs=1e-4)
        assert cka[0, 1] > max(cka[0, 2], cka[0, 3], cka[2, 3])
        tether_cos, _ = c.bank.compat(layer, "cosine", rows)
        assert tether_cos[0, 1] < 0.999  # the tethers alone do not see it


def trained(prep, ids=(0,)):
    t = trainer(prep, list(ids))
    while not t.done:  # every epoch of the tiny config
        t.train_window()
    t.report()  # what it had to say is not the point here
    return t


def test_merge_guard_rolls_back_a_merge_that_raises_validation_loss(tmp_path):
    prep = prepare(cfg_with(tmp_path, "policy.guard=true"))
    t = trained(prep)
    c = coordinator(prep, tmp_path)
    c.receive(publish(t))
    state = t.stack.member_state(0)
    zeros = np.zeros_like(tethers_of(t, 0)["out"])
    bad = Instruction("merge", 0, (1,), "out", 1.0, 0.7, "test", partner_tether=zeros)
    drift = Instruction(
        "drift", 0, 1, "fc1", 0.1, -2.0, "test", partner_tether=np.zeros((16, 64), np.float32)
    )
    t.receive(Reply((bad, drift)))
    after = t.stack.member_state(0)
    for k, v in state.items():
        if k != "tether.fc1":
            np.testing.assert_array_equal(after[k], v, err_msg=k)  # the merge is undone
    assert not np.array_equal(after["tether.fc1"], state["tether.fc1"])  # the drift is kept
    c.receive(t.report())  # the rejection rides the next report
    assert t.rejected.tolist() == [1] and c.rejected == 1
    np.testing.assert_array_equal(c.bank.row(0, "fc1"), tethers_of(t, 0)["fc1"])
    c.history.close()
    events = HistoryReader(tmp_path / "history.sqlite").events("rejected")
    assert len(events) == 1
    d = events[0].detail
    assert (events[0].model, d["partner"], d["layer"]) == (0, 1, "out")
    assert d["val_loss_after"] > d["val_loss_before"]
    # a restarted coordinator counts it again; the CLI lists it
    c2 = coordinator(prep, tmp_path, restore=True)
    assert c2.rejected == 1
    c2.history.close()
    out = cli("history", str(tmp_path), "--kind", "rejected", "--json")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["model"], row["partner"], row["layer"]) == (0, 1, "out")
    bad_kind = cli("history", str(tmp_path), "--kind", "merged")
    assert bad_kind.returncode == 2 and "rejected" in bad_kind.stderr


def test_merge_guard_keeps_a_merge_that_does_not_hurt(tmp_path):
    prep = prepare(cfg_with(tmp_path, "policy.guard=true"))
    t = trained(prep)
    own = tethers_of(t, 0)["fc2"]
    t.receive(Reply((Instruction("merge", 0, (1,), "fc2", 0.5, 0.7, "t", partner_tether=own),)))
    assert t.rejected.tolist() == [0] and not t.report().rejections


def test_the_merge_guard_undoes_only_the_harmed_model_of_a_stack(tmp_path):
    prep = prepare(cfg_with(tmp_path, "policy.guard=true"))
    t = trained(prep, [0, 1])
    before = [tethers_of(t, i) for i in range(2)]
    zeros = np.zeros_like(before[0]["out"])
    mail = (
        Instruction("merge", 0, (2,), "out", 1.0, 0.7, "t", partner_tether=zeros),
        Instruction("merge", 1, (3,), "fc2", 0.5, 0.7, "t", partner_tether=before[1]["fc2"]),
    )
    t.receive(Reply(mail))
    np.testing.assert_array_equal(tethers_of(t, 0)["out"], before[0]["out"])
    assert t.rejected.tolist() == [1, 0]
    (rej,) = t.report().rejections
    assert rej.model == 0 and [i.layer for i in rej.merges] == ["out"]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_repulsion_conserves_momentum_and_spreads_the_models(k, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, p))
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)
    r, kern = maths.rbf_repulsion(x, sq)
    np.testing.assert_allclose(r.sum(0), 0.0, atol=1e-9)  # forces cancel: the centre stays
    assert np.all(np.diag(kern) == 0) and np.all((kern >= 0) & (kern <= 1))
    moved = x + 0.1 * r
    mean_sq = sq[np.triu_indices(k, 1)].mean()
    new_sq = ((moved[:, None] - moved[None]) ** 2).sum(-1)[np.triu_indices(k, 1)].mean()
    assert new_sq >= mean_sq - 1e-12


def test_repulsive_drift_moves_every_model_away_from_the_others(tmp_path):
    prep = prepare(
        cfg_with(
            tmp_path,
            "policy.drift=repulsive",
            "compat.normalize=none",
            "policy.merge_above=2.0",  # no merges: cosine never exceeds 1
            "policy.drift_below=-1.0",
        )
    )
    t = trainer(prep, range(4))
    c = coordinator(prep, tmp_path)

    def spread(layer):
        x = np.stack([tethers_of(t, i)[layer].ravel() for i in range(4)]).astype(np.float64)
        return ((x[:, None] - x[None]) ** 2).sum(-1)[np.triu_indices(4, 1)].mean()

    start = {n: spread(n) for n in c.layers}
    mail = c.exchange(publish(t)).instructions  # everyone published: a round
    assert {(i.kind, i.partner) for i in mail} == {("drift", None)}  # away from a group:
    assert all(set(i.group) == set(range(4)) - {i.model} for i in mail)  # all the others
    assert len(mail) == 4 * len(c.layers)
    t.receive(Reply(mail))
    assert c.drifts == 4 * len(c.layers) and c.merges == 0
    c.history.close()  # the history lists each repulsive drift once, naming its group
    drifts = HistoryReader(tmp_path / "history.sqlite").decisions(kind="drift")
    assert len(drifts) == 4 * len(c.layers) and {d.partner for d in drifts} == {None}
    assert all(set(d.group) == set(range(4)) - {d.model} for d in drifts)
    for n in c.layers:
        assert spread(n) > start[n]
    assert_bank_matches(c, [t])


def test_shared_init_shares_weights_but_not_tethers(tmp_path):
    for init, same in (("shared", True), ("independent", False)):
        t = trainer(prepare(cfg_with(tmp_path, f"model.init={init}")), [0, 1])
        w, tether = t.stack.weight("fc1"), t.stack.tethers["fc1"]
        assert torch.equal(w[0], w[1]) == same
        assert not torch.equal(tether[0], tether[1])


def test_cka_with_fixed_peers_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cka"):
        load_config(
            None,
            ["compat.fn=cka", "peers=[{name: p, layer: fc2, file: t.txt}]"],
        )


@pytest.mark.parametrize(
    "key, value", [("policy.drift", "sideways"), ("policy.share", "all"), ("model.init", "x")]
)
def test_unknown_option_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load(None, ["policy.name=threshold", f"{key}={value}"])


def test_a_weight_merge_averages_the_tethered_weights(tmp_path):
    prep = prepare(cfg_with(tmp_path, "policy.share=both"))
    t = trainer(prep, [0, 1])
    w0 = (t.stack.weight("fc2")[0] * t.stack.tethers["fc2"][0]).detach().numpy().copy()
    other = t.stack.member_state(1)
    rng = np.random.default_rng(6)
    pw = rng.normal(size=(16, 16)).astype(np.float32)
    pb = rng.normal(size=16).astype(np.float32)
    pt = (1 + 0.1 * rng.normal(size=(16, 16))).astype(np.float32)
    b0 = t.stack.member_state(0)["fc2.bias"]
    ins = Instruction(  # the coordinator sends the difference: partner's - this model's
        "merge",
        0,
        1,
        "fc2",
        0.5,
        0.7,
        "t",
        partner_tether=pt,
        partner_weights=(pw - w0, pb - b0),
        share="both",
    )
    t.apply([ins])
    mine = t.stack.member_state(0)
    np.testing.assert_allclose(
        mine["fc2.weight"] * mine["tether.fc2"], 0.5 * w0 + 0.5 * pw, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(mine["fc2.bias"], 0.5 * b0 + 0.5 * pb, rtol=1e-5, atol=1e-6)
    for k, v in t.stack.member_state(1).items():  # the other model of the stack is untouched
        np.testing.assert_array_equal(v, other[k])


def test_lineage_leaves_out_merges_the_guard_undid(tmp_path):
    prep = prepare(pair_cfg(tmp_path))
    t = trainer(prep, [0, 1])
    c = coordinator(prep, tmp_path)
    mail = c.exchange(publish(t)).instructions
    mail0 = [i for i in mail if i.model == 0]
    assert len(mail0) == 3 and {i.round for i in mail} == {1}
    t.receive(Reply(tuple(mail)))
    c.reject(Rejection(0, 5, tuple(mail0[:2]), 0.1, 0.2, tethers_of(t, 0)))  # two of three
    c.history.close()
    h = HistoryReader(tmp_path / "history.sqlite")
    assert {e.detail["round"] for e in h.events("rejected")} == {1}
    assert [e.layer for e in h.lineage(0).edges] == [mail0[2].layer]  # the one kept
    assert len(h.lineage(1).edges) == 3  # model 1 kept all three
