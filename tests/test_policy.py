"""Policies on hand-built compatibility matrices."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.coordination.policies import POLICIES, LayerView, Population, policy_class
from ensemble.errors import ConfigError

P = dict(
    merge_above=0.8,
    drift_below=0.2,
    alpha=0.5,
    eta=0.1,
    max_merges_per_epoch=5,
    max_drifts_per_epoch=5,
    drift="pairwise",
)


def make_policy(name: str, settings: dict):
    """A policy with these settings (its own keys only) over a population of 20."""
    cls = policy_class(name)
    keys = {k: v for k, v in settings.items() if k in cls.Settings.model_fields}
    return cls(cls.Settings(**keys), Population(20, ["fc1", "fc2"]))


def params(merge_above, drift_below, alpha, eta, max_merges, max_drifts, drift="pairwise"):
    return dict(
        merge_above=merge_above,
        drift_below=drift_below,
        alpha=alpha,
        eta=eta,
        max_merges_per_epoch=max_merges,
        max_drifts_per_epoch=max_drifts,
        drift=drift,
    )


def view(c, models=None, sq=None):
    c = np.array(c, dtype=float)
    k = len(c)
    sq = np.ones((k, k)) - np.eye(k) if sq is None else np.array(sq, dtype=float)
    return LayerView(np.arange(k) if models is None else np.array(models), c, sq)


def pairs(instrs, kind):
    return sorted(
        {(min(i.model, i.partner), max(i.model, i.partner)) for i in instrs if i.kind == kind}
    )


def test_thresholds_and_hysteresis_band():
    c = [[1, 0.9, 0.5, 0.1], [0.9, 1, 0.5, 0.5], [0.5, 0.5, 1, 0.5], [0.1, 0.5, 0.5, 1]]
    out = make_policy("threshold", P).choose({"fc1": view(c)}, {})
    assert pairs(out, "merge") == [(0, 1)]
    # 0-3 is below drift_below but 0 is already matched; 0.5 pairs sit in the dead band
    assert pairs(out, "drift") == []
    c[2][3] = c[3][2] = 0.15
    out = make_policy("threshold", P).choose({"fc1": view(c)}, {})
    assert pairs(out, "drift") == [(2, 3)]


def test_both_partners_receive_each_instruction():
    out = make_policy("threshold", P).choose({"fc2": view([[1, 0.95], [0.95, 1]])}, {})
    assert {(i.model, i.partner) for i in out} == {(0, 1), (1, 0)}
    assert all(i.layer == "fc2" and i.rate == 0.5 and i.compat == 0.95 for i in out)


def test_greedy_matching_takes_best_pair_first_one_partner_each():
    c = [[1, 0.85, 0.95], [0.85, 1, 0.9], [0.95, 0.9, 1]]
    out = make_policy("threshold", P).choose({"fc1": view(c)}, {})
    assert pairs(out, "merge") == [(0, 2)]  # 0.95 first; 1 is left without a partner
    assert len(out) == 2


def test_model_ids_come_from_the_view_not_positions():
    out = make_policy("threshold", P).choose({"fc1": view([[1, 0.9], [0.9, 1]], models=[3, 7])}, {})
    assert pairs(out, "merge") == [(3, 7)]


def test_merge_cap_per_epoch():
    v = {"fc1": view([[1, 0.9], [0.9, 1]])}
    pol = make_policy("threshold", P)
    assert pairs(pol.choose(v, {("merge", 0): 4}), "merge") == [(0, 1)]
    assert pol.choose(v, {("merge", 0): 5}) == []
    assert pol.choose(v, {("merge", 1): 5}) == []


def test_merge_cap_counts_layers_within_one_round():
    p = params(0.8, 0.2, 0.5, 0.1, 1, 1)
    v = view([[1, 0.9], [0.9, 1]])
    out = make_policy("threshold", p).choose({"fc1": v, "fc2": v}, {})
    assert [i.layer for i in out] == ["fc1", "fc1"]


def test_drift_cap_per_epoch():
    v = {"fc1": view([[1, 0.1], [0.1, 1]])}
    pol = make_policy("threshold", P)
    assert pairs(pol.choose(v, {}), "drift") == [(0, 1)]
    assert pol.choose(v, {("drift", 1): 5}) == []


def test_identical_tethers_are_not_merged_again():
    out = make_policy("threshold", P).choose(
        {"fc1": view([[1, 1.0], [1.0, 1]], sq=[[0, 0], [0, 0]])}, {}
    )
    assert out == []


def test_seed_policy_merges_above_threshold_in_index_order_without_drift():
    c = [[1, 60, 70], [60, 1, 10], [70, 10, 1]]
    p = params(50, 50, 0.3, 0.1, 5, 5)
    out = make_policy("seed", p).choose({"fc2": view(c, sq=np.zeros((3, 3)))}, {})
    assert pairs(out, "merge") == [(0, 1)]  # first in index order, not the best
    assert all(i.rate == 0.5 for i in out)  # the seed averages, whatever alpha says
    assert pairs(out, "drift") == []


def test_none_policy_never_coordinates():
    pol = make_policy("none", P)
    assert pol.coordinates is False
    assert pol.decide(None).instructions == []


def test_unknown_policy_lists_the_names():
    with pytest.raises(ConfigError, match="bogus.*fedavg.*mean.*none.*seed.*threshold"):
        make_policy("bogus", P)
    assert {"threshold", "fedavg", "fedamp", "mean", "seed", "none"} <= set(POLICIES)


def reference_threshold(p: dict, layers, counts):
    """The threshold policy as it was written before it became array work: a Python loop
    over every pair in sorted order. The vectorised policy must decide exactly the same."""
    from types import SimpleNamespace

    from ensemble.coordination.compat import SAME_TOL
    from ensemble.protocol import Instruction

    p = SimpleNamespace(**p)
    counts = dict(counts)
    caps = {"merge": p.max_merges_per_epoch, "drift": p.max_drifts_per_epoch}

    def allows(kind, i, j):
        return counts.get((kind, i), 0) < caps[kind] and counts.get((kind, j), 0) < caps[kind]

    out = []
    for layer, v in layers.items():
        iu, ju = np.triu_indices(len(v.models), k=1)
        vals = v.compat[iu, ju]
        matched = set()
        passes = [("merge", np.argsort(-vals, kind="stable"), p.alpha)]
        if p.drift == "pairwise":
            passes.append(("drift", np.argsort(vals, kind="stable"), p.eta))
        for kind, order, rate in passes:
            for idx in order:
                a, b, c = int(iu[idx]), int(ju[idx]), float(vals[idx])
                if (c <= p.merge_above) if kind == "merge" else (c >= p.drift_below):
                    break
                i, j = int(v.models[a]), int(v.models[b])
                if i in matched or j in matched or not allows(kind, i, j):
                    continue
                if kind == "merge" and v.sq_dist[a, b] <= SAME_TOL:
                    continue
                matched |= {i, j}
                for m in (i, j):
                    counts[(kind, m)] = counts.get((kind, m), 0) + 1
                sign, bound = (">", "merge_above") if kind == "merge" else ("<", "drift_below")
                rule = f"compat {c:.4g} {sign} {bound}"
                out += [
                    Instruction(kind, i, (j,), layer, rate, c, rule),
                    Instruction(kind, j, (i,), layer, rate, c, rule),
                ]
        if p.drift == "repulsive":
            k = len(v.models)
            for a in range(k):
                i = int(v.models[a])
                if i in matched or not allows("drift", i, i):
                    continue
                counts[("drift", i)] = counts.get(("drift", i), 0) + 1
                c = float((v.compat[a].sum() - v.compat[a, a]) / max(k - 1, 1))
                others = tuple(int(m) for m in v.models if m != i)  # away from all of them
                rule = "repulsive: rbf kernel"
                out.append(Instruction("drift", i, others, layer, p.eta, c, rule, whole=True))
    return out


@settings(max_examples=300, deadline=None)
@given(
    k=st.integers(2, 14),
    levels=st.integers(2, 9),  # few distinct values: many ties
    seed=st.integers(0, 2**31 - 1),
    caps=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    drift=st.sampled_from(["pairwise", "repulsive"]),
)
def test_vectorised_threshold_decides_exactly_as_the_pairwise_loop(k, levels, seed, caps, drift):
    """Same bank, same decisions, in the same order: ties, identical tethers (squared
    distance 0), per-epoch caps spent across layers, both drift modes."""
    rng = np.random.default_rng(seed)
    p = params(0.3, -0.3, 0.5, 0.1, caps[0], caps[1], drift)
    layers = {}
    for layer in ("fc1", "fc2"):
        c = rng.integers(0, levels, (k, k)) / (levels - 1) * 2 - 1
        c = np.triu(c, 1) + np.triu(c, 1).T + np.eye(k)
        sq = rng.integers(0, 3, (k, k)).astype(float)
        sq = np.triu(sq, 1) + np.triu(sq, 1).T
        layers[layer] = LayerView(rng.permutation(20)[:k], c, sq)
    counts = {
        (kind, int(m)): int(rng.integers(0, 4)) for kind in ("merge", "drift") for m in range(20)
    }
    assert make_policy("threshold", p).choose(layers, counts) == reference_threshold(
        p, layers, counts
    )


def test_vectorised_threshold_equals_the_loop_on_a_large_real_shaped_round():
    """k = 300 with continuous compat values (z-scored cosines), the coordinator's regime."""
    rng = np.random.default_rng(0)
    t = rng.normal(1, 0.1, (300, 64))
    g = t @ t.T
    n = np.sqrt(np.diag(g))
    c = g / n[:, None] / n[None, :]
    off = ~np.eye(300, dtype=bool)
    c = (c - c[off].mean()) / c[off].std()
    v = LayerView(np.arange(300), c, np.ones((300, 300)) - np.eye(300))
    p = params(1.0, -1.0, 0.5, 0.1, 5, 5)
    got = make_policy("threshold", p).choose({"fc1": v}, {})
    assert len(got) > 100 and got == reference_threshold(p, {"fc1": v}, {})
