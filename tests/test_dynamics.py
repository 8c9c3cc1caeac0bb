"""Surge–collapse: exact pruning, surge only into zeros, entropy by hand, and the actions."""

import math

import pytest
import torch

from ensemble.config import DynamicsConfig
from ensemble.training.dynamics import SurgeCollapse, activation_entropy, collapse_, surge_


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_collapse_zeroes_exactly_the_configured_fraction(sparsity):
    w = torch.randn(40, 25)
    before = w.clone()
    frac = collapse_(w, sparsity)
    assert frac == pytest.approx(sparsity, abs=1e-9)
    assert int((w == 0).sum()) == round(sparsity * w.numel())
    kept = w != 0
    # the survivors are the largest |w| and are unchanged
    assert torch.equal(w[kept], before[kept])
    if kept.any() and (~kept).any():
        assert before[~kept].abs().max() <= before[kept].abs().min()


def test_surge_refills_only_zeros():
    w = torch.randn(30, 30)
    collapse_(w, 0.5)
    before = w.clone()
    n = surge_(w, 0.1, torch.Generator().manual_seed(0))
    assert n == 450
    was_zero = before == 0
    assert torch.equal(w[~was_zero], before[~was_zero])  # non-zeros untouched
    assert (w[was_zero] != 0).all()  # every zero refilled
    assert w[was_zero].std() == pytest.approx(0.1, rel=0.2)


def test_entropy_of_a_known_histogram():
    # 4 bins over [0, 4): counts 4, 2, 1, 1 -> p = .5, .25, .125, .125
    h = torch.tensor([0.1, 0.2, 0.3, 0.4, 1.5, 1.6, 2.5, 4.0])
    p = [0.5, 0.25, 0.125, 0.125]
    by_hand = -sum(q * math.log(q) for q in p) / math.log(4)
    assert activation_entropy(h, bins=4) == pytest.approx(by_hand, rel=1e-6)
    assert activation_entropy(torch.zeros(10), bins=4) == 0.0  # all equal: no spread
    uniform = torch.arange(400, dtype=torch.float32)
    assert activation_entropy(uniform, bins=8) == pytest.approx(1.0, abs=1e-6)


def cfg(**kw):
    base = dict(
        mode="entropy",
        high_entropy=0.8,
        low_entropy=0.2,
        plateau_window=4,
        plateau_tol=0.01,
        cooldown=0,
    )
    return DynamicsConfig(**{**base, **kw})


def test_entropy_mode_actions():
    sc = SurgeCollapse(cfg(), seed=0)
    assert sc.decide(1, [0.9, 0.95]) == ["collapse", "energy"]  # high
    assert sc.decide(2, [0.1, 0.15]) == ["input_noise"]  # low
    assert SurgeCollapse(cfg(), 0).decide(1, [0.5]) == []  # in between, no plateau yet
    flat = SurgeCollapse(cfg(), 0)
    acts = [flat.decide(s, [0.5 + 0.001 * s]) for s in range(1, 6)]
    assert acts[:3] == [[], [], []] and acts[3] == ["collapse"]  # plateau once window full
    moving = SurgeCollapse(cfg(), 0)
    assert all(moving.decide(s, [0.3 + 0.05 * s]) == [] for s in range(1, 8))


def test_fixed_mode_is_the_seed_schedule():
    sc = SurgeCollapse(DynamicsConfig(mode="fixed", collapse_every=100, surge_every=200), 0)
    assert sc.decide(100, []) == ["collapse"]
    assert sc.decide(200, []) == ["collapse", "surge"]
    assert sc.decide(150, []) == []


def test_act_applies_records_entropy_and_cools_down():
    sc = SurgeCollapse(cfg(cooldown=10, sparsity=0.5), seed=0)
    w = {"fc1": torch.randn(8, 8), "fc2": torch.randn(8, 8)}
    (collapse, energy) = sc.act(5, w, [0.9, 0.95])
    assert collapse.kind == "collapse" and collapse.detail["entropy"] == [0.9, 0.95]
    assert collapse.detail["sparsity"] == {"fc1": 0.5, "fc2": 0.5}
    assert energy.kind == "energy"
    assert all(float((v == 0).float().mean()) == 0.5 for v in w.values())  # energy keeps zeros
    assert sc.act(6, w, [0.9, 0.95]) == []  # cooling down
    (noise,) = sc.act(20, w, [0.1])
    assert noise.kind == "input_noise" and noise.detail["until_step"] == 30
    x = torch.zeros(4, 3)
    assert not torch.equal(sc.input_noise(25, x), x) and torch.equal(sc.input_noise(31, x), x)


def test_bad_dynamics_config():
    with pytest.raises(ValueError, match=r"low_entropy \(0.9\) must be < high_entropy"):
        DynamicsConfig(low_entropy=0.9, high_entropy=0.5)
