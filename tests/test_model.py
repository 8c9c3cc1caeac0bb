"""Members and their tethers: a plain module, tethers beside it, W ⊙ T in the forward."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble.training.model import (
    MLP,
    PRESETS,
    attach_tethers,
    fold_tethers,
    hidden_sizes,
    init_tethers,
    mlp,
    tethered_layers,
)


def test_forward_is_linear_of_w_times_t_and_never_mutates_weights():
    m = mlp([5, 4, 3], seed=1)
    t = init_tethers(m, "uniform", 0.1, seed=2)
    w_before = {n: getattr(m, n).weight.detach().clone() for n in m.names}
    x = torch.randn(7, 5)
    h = torch.relu(x @ (m.fc1.weight * t["fc1"]).T + m.fc1.bias)
    expected = h @ (m.out.weight * t["out"]).T + m.out.bias
    tethered = attach_tethers(copy.deepcopy(m), t)
    torch.testing.assert_close(tethered(x), expected)
    tethered(x)
    for n in m.names:  # the seed's first version multiplied weight.data in place: never
        torch.testing.assert_close(getattr(m, n).weight, w_before[n])


def test_tethers_are_buffers_not_parameters():
    m = attach_tethers(mlp([5, 4, 3], 0), init_tethers(mlp([5, 4, 3], 0), "normal", 0.1, 1))
    names = {n for n, _ in m.named_parameters()}
    assert not any("tether" in n for n in names)
    loss = F.cross_entropy(m(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    t = m.fc1.parametrizations.weight[0].tether
    assert t.grad is None and not t.requires_grad


def test_presets_and_layer_names():
    assert PRESETS["seed-dtnn"] == [64, 64] and PRESETS["autoregressive"] == [256]
    m = MLP([128, *hidden_sizes("seed-dtnn", None), 10])
    assert tethered_layers(m) == ["fc1", "fc2", "out"]
    shapes = {n: tuple(t.shape) for n, t in init_tethers(m, "ones", 0.1, 0).items()}
    assert shapes == {"fc1": (64, 128), "fc2": (64, 64), "out": (10, 64)}
    assert hidden_sizes("seed-dtnn", [8]) == [8]
    with pytest.raises(ValueError, match="model.preset: unknown name 'nope'"):
        hidden_sizes("nope", None)


@pytest.mark.parametrize("init", ["uniform", "ones", "normal"])
def test_tether_inits(init):
    t = init_tethers(MLP([20, 30, 10]), init, 0.1, seed=0)["fc1"].numpy()
    if init == "uniform":
        assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.05
    elif init == "ones":
        assert np.all(t == 1)
    else:
        assert abs(t.mean() - 1) < 0.02 and abs(t.std() - 0.1) < 0.02


def test_folded_state_loads_into_a_plain_module_and_computes_the_same():
    m = mlp([6, 5, 3], seed=4)
    tethered = attach_tethers(copy.deepcopy(m), init_tethers(m, "normal", 0.3, seed=5))
    folded = fold_tethers(tethered)
    assert set(folded) == set(m.state_dict())  # exactly the plain module's keys
    plain = mlp([6, 5, 3], seed=99)
    plain.load_state_dict(folded)
    x = torch.randn(8, 6)
    torch.testing.assert_close(plain(x), tethered(x))


def test_attaching_a_tether_to_an_unknown_layer_names_it():
    with pytest.raises(ValueError, match="unknown layer 'fc9'"):
        attach_tethers(mlp([5, 4, 3], 0), {"fc9": torch.ones(4, 5)})
