"""The trainer's evaluation (Validation) and checkpointing (Checkpoints), each on its own:
a stack of tiny MLPs, no trainer, no coordinator."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble.training.checkpoint import Checkpoints
from ensemble.training.model import init_tethers, mlp
from ensemble.training.stack import Stack, cross_entropy
from ensemble.training.validation import Validation

SIZES = [4, 8, 3]
CPU = torch.device("cpu")


def members(k=3):
    mods = [mlp(SIZES, seed=i) for i in range(k)]
    return mods, [init_tethers(m, "uniform", 0.1, seed=100 + i) for i, m in enumerate(mods)]


def stack_of(k=3) -> Stack:
    return Stack(*members(k))


def data(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, SIZES[0])).astype(np.float32), rng.integers(0, 3, n)


def alone(i: int, k=3) -> torch.nn.Module:
    """Member i as a plain module, its weights W * T: what the stack computes for it."""
    mods, tethers = members(k)
    m = copy.deepcopy(mods[i])
    with torch.no_grad():
        for name, t in tethers[i].items():
            getattr(m, name).weight.mul_(t)
    return m


def loss_acc(m, x, y):
    with torch.no_grad():
        logits = m(torch.as_tensor(x))
    y = torch.as_tensor(y)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(stack, opt, x, y, steps=2):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        cross_entropy(
            stack.forward(torch.as_tensor(x), shared=True), torch.as_tensor(y)
        ).sum().backward()
        opt.step()


# --- Validation --------------------------------------------------------------------------
def test_the_whole_split_scores_each_model_as_it_scores_alone():
    x, y = data()
    scores, probs = Validation(stack_of(), x, y, CPU).whole()
    assert scores.shape == (3, 2) and probs.shape == (3, 20, 3)
    np.testing.assert_allclose(probs.sum(2), 1, rtol=1e-5)
    for i in range(3):
        assert tuple(scores[i]) == pytest.approx(loss_acc(alone(i), x, y), rel=1e-5)
    assert len(set(scores[:, 0])) == 3  # three different models


def test_own_rows_score_each_model_on_its_rows_only():
    x, y = data()
    rows = [np.arange(0, 5), np.arange(5, 17), np.array([3, 19])]  # lengths differ: padding
    v = Validation(stack_of(), x, y, CPU, val_rows=rows)
    own = v.own()
    for i, r in enumerate(rows):
        assert tuple(own[i]) == pytest.approx(loss_acc(alone(i), x[r], y[r]), rel=1e-5)
    assert not np.allclose(own, v.whole()[0])
    everyone = Validation(stack_of(), x, y, CPU)  # no rows of its own: the whole split
    np.testing.assert_array_equal(everyone.own(), everyone.whole()[0])


def test_the_guard_puts_back_only_the_models_whose_loss_rose():
    x, y = data()
    stack = stack_of()
    v = Validation(stack, x, y, CPU)
    before = v.own()[:, 0]
    start = {key: t.clone() for key, t in stack.rows(slice(None)).items()}
    worst = int(np.bincount(y, minlength=3).argmin())

    def apply():  # model 0 gets worse, model 1 better (a step down its gradient), 2 worse
        logits = stack.forward(torch.as_tensor(x), shared=True)[1]
        grads = torch.autograd.grad(
            F.cross_entropy(logits, torch.as_tensor(y)), [stack.weight("fc1")]
        )
        with torch.no_grad():
            stack.weight("fc1")[1] -= 0.05 * grads[0][1]
            for i in (0, 2):
                stack.params["out.bias"][i, worst] += 50.0

    undone = v.guard([0, 1], apply)
    after = v.own()[:, 0]
    assert [u[0] for u in undone] == [0]
    _, was, rose = undone[0]
    assert was == pytest.approx(before[0]) and rose > was + 10
    now = stack.rows(slice(None))
    for key, t in now.items():
        torch.testing.assert_close(t[0], start[key][0], rtol=0, atol=0)  # put back exactly
    assert after[0] == pytest.approx(before[0])
    assert after[1] < before[1]  # kept: its loss fell
    assert after[2] > before[2] + 10  # not guarded: kept as it was made
    assert not torch.equal(now["fc1.weight"][1], start["fc1.weight"][1])


def test_the_probe_batch_gives_each_selected_models_outputs_and_grams():
    x, y = data()
    stack = stack_of()
    v = Validation(stack, x, y, CPU, probe_size=6)
    sel = torch.tensor([2, 0])
    out, grams = v.outputs(sel), v.grams(sel)
    assert out.shape == (2, 6, 3) and set(grams) == {"fc1", "out"}
    for j, i in enumerate([2, 0]):
        m = alone(i)
        with torch.no_grad():
            hidden = F.relu(m.fc1(torch.as_tensor(x[:6])))
            logits = m.out(hidden)
        np.testing.assert_allclose(out[j], torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-6)
        for name, h in (("fc1", hidden), ("out", logits)):
            hc = h - h.mean(0, keepdim=True)
            assert grams[name][j].shape == (6, 6)
            np.testing.assert_allclose(grams[name][j], (hc @ hc.T).numpy(), rtol=1e-4, atol=1e-5)


# --- Checkpoints -------------------------------------------------------------------------
def adam(stack):
    return torch.optim.Adam(stack.parameters(), lr=0.01)


def test_a_checkpoint_restores_the_stack_and_adam_and_returns_the_progress(tmp_path):
    x, y = data()
    stack = stack_of()
    opt = adam(stack)
    train(stack, opt, x, y)
    ckpt = Checkpoints(stack, opt, tmp_path / "c" / "stack.pt", every=0)
    assert ckpt.save(lambda: {"step": 2, "epoch": 1})
    saved = ckpt.state(copy=True)
    train(stack, opt, x, y)  # on past the checkpoint

    again = stack_of()
    opt2 = adam(again)
    progress = Checkpoints(again, opt2, tmp_path / "c" / "stack.pt", every=0).load()
    assert progress == {"step": 2, "epoch": 1}
    state = Checkpoints(again, opt2, None, every=0).state()
    for key, t in saved["rows"].items():
        torch.testing.assert_close(state["rows"][key], t, rtol=0, atol=0)
    for name, moments in saved["moments"].items():
        for key, t in moments.items():
            torch.testing.assert_close(state["moments"][name][key], t, rtol=0, atol=0)
    assert not torch.equal(again.weight("fc1"), stack.weight("fc1"))  # the older state


def test_a_checkpoint_waits_its_seconds_and_none_without_a_path(tmp_path):
    stack = stack_of()
    opt = adam(stack)
    ckpt = Checkpoints(stack, opt, tmp_path / "stack.pt", every=3600)
    assert ckpt.save(lambda: {"step": 0})
    assert not ckpt.save(lambda: pytest.fail("not due: progress is not asked for"))
    nowhere = Checkpoints(stack, opt, None, every=0)
    assert not nowhere.save(lambda: {"step": 0}) and nowhere.load() is None
    assert Checkpoints(stack, opt, tmp_path / "missing.pt", every=0).load() is None


def test_roll_back_restores_one_models_slices_and_zeroes_its_moments():
    x, y = data()
    stack = stack_of()
    opt = adam(stack)
    ckpt = Checkpoints(stack, opt, None, every=0)
    ckpt.take_snapshot()  # before Adam's first step: no moments yet
    train(stack, opt, x, y)
    trained = ckpt.state(copy=True)
    ckpt.roll_back(1)
    now = ckpt.state()
    for key, t in now["rows"].items():
        torch.testing.assert_close(t[1], ckpt.snapshot["rows"][key][1], rtol=0, atol=0)
        for i in (0, 2):
            torch.testing.assert_close(t[i], trained["rows"][key][i], rtol=0, atol=0)
    for name, moments in now["moments"].items():
        for key, t in moments.items():
            assert not t[1].any()
            torch.testing.assert_close(t[0], trained["moments"][name][key][0], rtol=0, atol=0)
