"""Policies on hand-built compatibility matrices."""

import numpy as np
import pytest

from ensemble.policy import POLICIES, LayerView, PolicyParams, make_policy

P = PolicyParams(
    merge_above=0.8,
    drift_below=0.2,
    alpha=0.5,
    eta=0.1,
    max_merges_per_epoch=5,
    max_drifts_per_epoch=5,
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
    out = make_policy("threshold", P).decide({"fc1": view(c)}, {})
    assert pairs(out, "merge") == [(0, 1)]
    # 0-3 is below drift_below but 0 is already matched; 0.5 pairs sit in the dead band
    assert pairs(out, "drift") == []
    c[2][3] = c[3][2] = 0.15
    out = make_policy("threshold", P).decide({"fc1": view(c)}, {})
    assert pairs(out, "drift") == [(2, 3)]


def test_both_partners_receive_each_instruction():
    out = make_policy("threshold", P).decide({"fc2": view([[1, 0.95], [0.95, 1]])}, {})
    assert {(i.model, i.partner) for i in out} == {(0, 1), (1, 0)}
    assert all(i.layer == "fc2" and i.rate == 0.5 and i.compat == 0.95 for i in out)


def test_greedy_matching_takes_best_pair_first_one_partner_each():
    c = [[1, 0.85, 0.95], [0.85, 1, 0.9], [0.95, 0.9, 1]]
    out = make_policy("threshold", P).decide({"fc1": view(c)}, {})
    assert pairs(out, "merge") == [(0, 2)]  # 0.95 first; 1 is left without a partner
    assert len(out) == 2


def test_model_ids_come_from_the_view_not_positions():
    out = make_policy("threshold", P).decide({"fc1": view([[1, 0.9], [0.9, 1]], models=[3, 7])}, {})
    assert pairs(out, "merge") == [(3, 7)]


def test_merge_cap_per_epoch():
    v = {"fc1": view([[1, 0.9], [0.9, 1]])}
    pol = make_policy("threshold", P)
    assert pairs(pol.decide(v, {("merge", 0): 4}), "merge") == [(0, 1)]
    assert pol.decide(v, {("merge", 0): 5}) == []
    assert pol.decide(v, {("merge", 1): 5}) == []


def test_merge_cap_counts_layers_within_one_round():
    p = PolicyParams(0.8, 0.2, 0.5, 0.1, max_merges_per_epoch=1, max_drifts_per_epoch=1)
    v = view([[1, 0.9], [0.9, 1]])
    out = make_policy("threshold", p).decide({"fc1": v, "fc2": v}, {})
    assert [i.layer for i in out] == ["fc1", "fc1"]


def test_drift_cap_per_epoch():
    v = {"fc1": view([[1, 0.1], [0.1, 1]])}
    pol = make_policy("threshold", P)
    assert pairs(pol.decide(v, {}), "drift") == [(0, 1)]
    assert pol.decide(v, {("drift", 1): 5}) == []


def test_identical_tethers_are_not_merged_again():
    out = make_policy("threshold", P).decide(
        {"fc1": view([[1, 1.0], [1.0, 1]], sq=[[0, 0], [0, 0]])}, {}
    )
    assert out == []


def test_seed_policy_merges_above_threshold_in_index_order_without_drift():
    c = [[1, 60, 70], [60, 1, 10], [70, 10, 1]]
    p = PolicyParams(50, 50, 0.3, 0.1, 5, 5)
    out = make_policy("seed", p).decide({"fc2": view(c, sq=np.zeros((3, 3)))}, {})
    assert pairs(out, "merge") == [(0, 1)]  # first in index order, not the best
    assert all(i.rate == 0.5 for i in out)  # the seed averages, whatever alpha says
    assert pairs(out, "drift") == []


def test_none_policy_never_coordinates():
    pol = make_policy("none", P)
    assert pol.coordinates is False
    assert pol.decide({"fc1": view([[1, 0.9], [0.9, 1]])}, {}) == []


def test_unknown_policy_lists_the_names():
    with pytest.raises(ValueError, match="bogus.*fedavg.*mean.*none.*seed.*threshold"):
        make_policy("bogus", P)
    assert set(POLICIES) == {"threshold", "fedavg", "mean", "seed", "none"}
