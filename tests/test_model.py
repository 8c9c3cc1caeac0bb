"""The tethered MLP."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble.model import PRESETS, TetheredMLP, hidden_sizes


def test_forward_is_linear_of_w_times_t_and_never_mutates_weights():
    m = TetheredMLP([5, 4, 3], tether_init="uniform", seed=1)
    w_before = {n: m.layers[n].linear.weight.detach().clone() for n in m.names}
    x = torch.randn(7, 5)
    fc1, out = m.layers["fc1"], m.layers["out"]
    h = torch.relu(x @ (fc1.linear.weight * fc1.tether).T + fc1.linear.bias)
    expected = h @ (out.linear.weight * out.tether).T + out.linear.bias
    torch.testing.assert_close(m(x), expected)
    m(x)
    for n in m.names:  # the seed's first version multiplied weight.data in place: never
        torch.testing.assert_close(m.layers[n].linear.weight, w_before[n])


def test_tethers_are_buffers_not_parameters():
    m = TetheredMLP([5, 4, 3])
    names = {n for n, _ in m.named_parameters()}
    assert not any("tether" in n for n in names)
    loss = F.cross_entropy(m(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert m.layers["fc1"].tether.grad is None


def test_presets_and_layer_names():
    assert PRESETS["seed-dtnn"] == [64, 64] and PRESETS["autoregressive"] == [256]
    m = TetheredMLP([128, *hidden_sizes("seed-dtnn", None), 10])
    assert m.tether_shapes() == {"fc1": (64, 128), "fc2": (64, 64), "out": (10, 64)}
    assert hidden_sizes("seed-dtnn", [8]) == [8]


@pytest.mark.parametrize("init", ["uniform", "ones", "normal"])
def test_tether_inits(init):
    t = TetheredMLP([20, 30, 10], tether_init=init, tether_std=0.1).export_tethers()["fc1"]
    if init == "uniform":
        assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.05
    elif init == "ones":
        assert np.all(t == 1)
    else:
        assert abs(t.mean() - 1) < 0.02 and abs(t.std() - 0.1) < 0.02


def test_export_import_round_trip_and_shape_errors():
    a, b = TetheredMLP([5, 4, 3], seed=1), TetheredMLP([5, 4, 3], seed=2)
    b.import_tethers(a.export_tethers())
    for n in a.names:
        np.testing.assert_array_equal(a.export_tethers()[n], b.export_tethers()[n])
    with pytest.raises(ValueError, match=r"tether 'fc1' has shape \(5, 4\), expected \(4, 5\)"):
        b.import_tethers({"fc1": np.ones((5, 4), dtype=np.float32)})
    with pytest.raises(ValueError, match="unknown layer 'fc9'"):
        b.import_tethers({"fc9": np.ones((4, 5))})
