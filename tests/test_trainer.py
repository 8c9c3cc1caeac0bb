"""The one trainer: a stack of k models (k = 1 included), each training as it would alone."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble.config import load_config
from ensemble.outputs.inference import load_member
from ensemble.protocol import (
    EpochReport,
    Event,
    Instruction,
    JoinRequest,
    Rejection,
    Reply,
    StackReport,
    apply_instruction,
)
from ensemble.runtime.job import drive, prepare
from ensemble.training.model import build_member, member_seed
from ensemble.training.stack import Stack
from ensemble.training.trainer import run_stack
from tests.conftest import tiny
from tests.helpers import assert_bank_matches, coordinator, trainer, with_


def reference(sizes, seed, model, rows, x, y, batch, steps, lr=1e-3, std=0.1):
    """The trusted loop, plain PyTorch: one tethered MLP, Adam, its own shuffled stream.
    Yields (loss, {name: tensor}) after every step."""
    s = member_seed(seed, model)
    torch.manual_seed(s)
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    gen = torch.Generator().manual_seed(s + 7919)
    tethers = [1.0 + std * torch.randn(tuple(m.weight.shape), generator=gen) for m in layers]
    params = [p for m in layers for p in (m.weight, m.bias)]
    opt = torch.optim.Adam(params, lr=lr)
    shuffle, rows = torch.Generator().manual_seed(s), torch.as_tensor(rows)
    stream = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while len(stream) < batch:  # fresh shuffles of its rows, end to end
            stream = torch.cat([stream, rows[torch.randperm(len(rows), generator=shuffle)]])
        idx, stream = stream[:batch], stream[batch:]
        h = x[idx]
        for i, (m, t) in enumerate(zip(layers, tethers, strict=True)):
            h = F.linear(h, m.weight * t, m.bias)
            h = torch.relu(h) if i < len(layers) - 1 else h
        loss = F.cross_entropy(h, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield float(loss.detach()), params


def cfg_for(tmp_path, *extra):
    return load_config(None, tiny(f"job=t-{tmp_path.name}", "policy.name=none", *extra))


@pytest.mark.parametrize("ids", [[0], [3, 0, 2, 1]])
def test_the_trainer_equals_the_plain_pytorch_loop_step_for_step(tmp_path, ids):
    cfg = cfg_for(tmp_path, "train.batch_size=16")
    prep = prepare(cfg)
    t = trainer(prep, ids)
    x, y = torch.as_tensor(prep.data.x_train), torch.as_tensor(prep.data.y_train)
    steps = prep.steps_per_epoch + 5  # into the second epoch: the stream carries over
    sizes = [x.shape[1], 16, 16, prep.data.classes]
    refs = [reference(sizes, cfg.seed, m, prep.parts.train[m], x, y, 16, steps) for m in ids]
    t.begin_epoch()
    for step in range(steps):
        if t.pos == t.steps_per_epoch:
            t.pos = 0
            t.begin_epoch()
        t.train_step()
        got = t.window[t.filled - 1].tolist()
        t.filled %= t.window.shape[0]
        for i, ref in enumerate(refs):
            loss, params = next(ref)
            assert got[i] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, i)
            mine = list(t.stack.params.values())
            for p_ref, p in zip(params, mine, strict=True):
                torch.testing.assert_close(p[i].detach(), p_ref.detach(), rtol=1e-5, atol=1e-6)


def test_the_fused_mlp_and_torch_func_give_the_same_function(tmp_path):
    cfg = cfg_for(tmp_path)
    prep = prepare(cfg)
    t = trainer(prep, [0, 1, 2])
    t.train_window()  # trained a little: weights and tethers both differ per model
    states = [t.stack.member_state(i) for i in range(3)]
    plain = []
    for state in states:  # the same modules, tethers kept apart
        m, _ = build_member(cfg, prep.data.features, prep.data.classes, 0)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in state.items() if "tether" not in k})
        plain.append(m)
    tethers = [{n: torch.from_numpy(s[f"tether.{n}"]) for n in t.layers} for s in states]
    generic = Stack(plain, tethers, fused=False)
    x = torch.as_tensor(prep.data.x_val[:9])
    fused_logits, fused_taps = t.stack.forward_taps(x, shared=True)
    gen_logits, gen_taps = generic.forward_taps(x, shared=True)
    torch.testing.assert_close(gen_logits, fused_logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(gen_taps, fused_taps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    xb = torch.as_tensor(prep.data.x_train[:27]).reshape(3, 9, -1)  # a batch per model
    torch.testing.assert_close(generic.forward(xb), t.stack.forward(xb), rtol=1e-5, atol=1e-6)
    for i, state in enumerate(states):  # a saved member is the same function, alone
        m = load_member(cfg, prep.data.features, prep.data.classes, state)
        torch.testing.assert_close(m(x), fused_logits[i], rtol=1e-5, atol=1e-6)


DYNAMICS = {
    "fixed": {"mode": "fixed", "collapse_every": 2, "surge_every": 3, "sparsity": 0.3},
    "entropy-high": {"mode": "entropy", "high_entropy": 0.05, "low_entropy": 0.01, "cooldown": 0},
    "entropy-low": {"mode": "entropy", "high_entropy": 0.999, "low_entropy": 0.99, "cooldown": 0},
}


@pytest.mark.parametrize("dynamics", list(DYNAMICS))
def test_surge_collapse_in_a_stack_equals_each_model_alone(tiny_cfg, dynamics):
    prep = prepare(with_(tiny_cfg, dynamics=DYNAMICS[dynamics]))
    ids = [2, 0, 3]
    stack, singles = trainer(prep, ids), [trainer(prep, [m]) for m in ids]
    for t in (stack, *singles):
        t.train_window()
    kinds = [[e.kind for e in stack.outbox.events if e.model == m] for m in ids]
    assert any(kinds)
    for i, s in enumerate(singles):
        assert kinds[i] == [e.kind for e in s.outbox.events]
        assert stack.entropy[i] == pytest.approx(s.entropy[0], abs=1e-5)
        for key, v in s.stack.member_state(0).items():
            np.testing.assert_allclose(stack.stack.member_state(i)[key], v, rtol=1e-5, atol=1e-6)


def test_rollback_restores_only_the_poisoned_models_slices(tiny_cfg):
    prep = prepare(with_(tiny_cfg, faults={"on_poison": "rollback"}))
    clean, bad = trainer(prep, [0, 1, 2, 3]), trainer(prep, [0, 1, 2, 3])
    for t in (clean, bad):
        t.train_window()  # epoch 0 began with a snapshot of the stack
    start = bad.snapshot
    with torch.no_grad():  # model 1 blows up mid-epoch
        bad.stack.weight("fc1")[1, 0, 0] = float("nan")
    for t in (clean, bad):
        t.train_window()
    assert bad.rollbacks.tolist() == [0, 1, 0, 0] and not bad.failed.any()
    now = bad.state()
    for key, v in now["rows"].items():
        torch.testing.assert_close(v[1], start["rows"][key][1])  # back to the epoch's start
        for i in (0, 2, 3):  # the others trained on, exactly as in the clean stack
            torch.testing.assert_close(v[i], clean.state()["rows"][key][i])
    for moments in now["moments"].values():  # Adam had not stepped at the start: zeros
        for v in moments.values():
            assert not v[1].any() and v[0].any()
    report = bad.report()
    assert [(e.kind, e.model) for e in report.events] == [("quarantined", 1)]
    assert report.rejoined == ((1, "rolled_back"),) and not report.published[1]


def test_a_non_finite_model_is_isolated_quarantined_and_stopped(tiny_cfg, tmp_path):
    prep = prepare(with_(tiny_cfg, faults={"on_poison": "stop"}))
    clean, bad = trainer(prep, [0, 1, 2, 3]), trainer(prep, [0, 1, 2, 3])
    with torch.no_grad():
        bad.stack.weight("fc1")[1, 0, 0] = float("nan")
    for t in (clean, bad):
        t.train_window()
    assert bad.failed.tolist() == [False, True, False, False]
    for i in (0, 2, 3):  # the sum of losses keeps the other models' gradients their own
        for key, v in clean.stack.member_state(i).items():
            np.testing.assert_array_equal(bad.stack.member_state(i)[key], v)
    coord = coordinator(prep, tmp_path)
    drive([bad], coord)
    results = bad.results(0.0, 1.0)
    coord.history.close()
    assert [r.failed for r in results] == [False, True, False, False]
    assert_bank_matches(coord, [bad])
    h = _history(tmp_path)
    assert [e.model for e in h.events("quarantined")] == [1]
    assert [e.model for e in h.events("failed")] == [1]
    assert sorted(e.model for e in h.events("finished")) == [0, 2, 3]
    assert 1 not in {p.model for p in h.publications()}


def _history(run_dir):
    from ensemble.history import HistoryReader

    return HistoryReader(run_dir / "history.sqlite")


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3]], [[2, 0], [3, 1]], [[0], [1], [2], [3]]])
def test_a_job_of_stacks_records_decisions_and_the_bank_matches_the_models(
    tiny_cfg, tmp_path, groups
):
    prep = prepare(tiny_cfg)
    coord = coordinator(prep, tmp_path)
    trainers = [trainer(prep, g) for g in groups]
    drive(trainers, coord)
    coord.history.close()
    assert_bank_matches(coord, trainers)
    h = _history(tmp_path)
    assert h.count("publications") == coord.publications > 0
    decisions = h.decisions()
    assert decisions and coord.rounds > 0
    for d in decisions:
        assert d.compat > d.merge_above if d.kind == "merge" else d.compat < d.drift_below
    assert len(h.events("finished")) == 4
    ensemble_val = {(-1, "val")}  # recorded once every model's val probs arrived
    assert {(m.model, m.split) for m in h.metrics()} == ensemble_val | {
        (m, s) for m in range(4) for s in ("train", "val")
    }


class LateLink:
    """The coordinator decides at once, but each reply reaches the trainer only after
    `delay` more readiness checks, as over Ray: mail piles up while the trainer trains on."""

    def __init__(self, coord, delay):
        self.coord, self.delay, self.blocked = coord, delay, 0.0

    def join(self, request):
        return self.coord.join(request)

    def send(self, report):
        return Late(self.coord.exchange(report), self.delay)


class Late:
    def __init__(self, reply, delay):
        self.reply, self.left = reply, delay

    def done(self):
        self.left -= 1
        return self.left < 0

    def result(self):
        return self.reply


@pytest.mark.parametrize("delay", [0, 2, 1000])
def test_late_replies_still_leave_the_bank_equal_to_the_models(tiny_cfg, tmp_path, delay):
    """Asynchronous mode: reports sent while decisions are still on their way must not undo
    them in the bank; at the end every model holds exactly its bank row."""
    prep = prepare(with_(tiny_cfg, coordinator={"mode": "async"}))
    coord = coordinator(prep, tmp_path)
    ts = [trainer(prep, [0, 1]), trainer(prep, [2, 3])]
    links = [LateLink(coord, delay) for _ in ts]
    runs = [_steps(t, link) for t, link in zip(ts, links, strict=True)]
    while runs:  # the two stacks take turns, one boundary at a time
        for r in list(runs):
            if next(r, "end") == "end":
                runs.remove(r)
    coord.history.close()
    assert coord.rounds > 0 and coord.merges + coord.drifts > 0
    assert_bank_matches(coord, ts)
    if delay:
        assert coord.progress()["staleness"]["max"] > 0


def _steps(t, link):
    """run_stack, one boundary per next(): lets stacks interleave in one process."""
    t.receive(link.join(t.join_request()))
    pending = None
    while True:
        t.train_window()
        if pending is not None and (t.done or pending.done()):
            t.receive(pending.result())
            pending = None
        if pending is None:
            pending = link.send(t.report())
            if t.done:
                t.receive(pending.result())
                pending = None
        if t.done and pending is None and not t.has_news:
            return
        yield


def test_run_stack_alone_trains_every_epoch(tiny_cfg, tmp_path):
    prep = prepare(tiny_cfg)
    coord = coordinator(prep, tmp_path)
    t = trainer(prep, [0, 1, 2, 3])
    results = run_stack(t, LateLink(coord, 0), sync=True)
    assert [r.steps for r in results] == [prep.steps_per_epoch * tiny_cfg.train.epochs] * 4
    assert all(r.test_probs.shape == (len(prep.data.y_test), prep.data.classes) for r in results)
    assert_bank_matches(coord, [t])


def test_protocol_messages_survive_the_wire():
    """Every message crosses a process boundary (Ray pickles it) whole: a round trip gives
    the same fields and arrays."""
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 3)).astype(np.float32)
    ins = Instruction(
        "merge",
        1,
        (2,),
        "fc1",
        0.5,
        1.2,
        "rule",
        partner_tether=t,
        partner_weights=(t, t[0]),
        round=3,
        step=40,
    )
    messages = [
        ins,
        Reply((ins,)),
        JoinRequest(np.array([1, 2]), 5, "restarted", {"pid": 1}),
        Rejection(1, 41, (ins,), 0.2, 0.3, {"fc1": t}),
        EpochReport(0, np.array([1, 2]), np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 4, 3))),
        StackReport(
            models=np.array([1, 2]),
            step=40,
            epoch=0,
            losses=np.array([0.5, 0.6]),
            grad_norms=np.array([1.0, 2.0]),
            published=np.array([True, False]),
            introduced=np.array([True, False]),
            tethers={"fc1": t[None]},
            events=(Event("collapse", 1, 40, {"sparsity": 0.5}),),
            rejections=(Rejection(1, 41, (ins,), 0.2, 0.3, {"fc1": t}),),
            final=True,
        ),
    ]
    for msg in messages:
        back = pickle.loads(pickle.dumps(msg))
        assert type(back) is type(msg)
        for field in msg.__dataclass_fields__:
            _same(getattr(back, field), getattr(msg, field))
    assert back.published_ids().tolist() == [1]
    np.testing.assert_array_equal(apply_instruction(t, ins, 0.0, 2.0), t)  # merge with itself


def _same(a, b):
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        for f in a.__dataclass_fields__:
            _same(getattr(a, f), getattr(b, f))
    else:
        assert a == b


def test_a_restarted_stack_resumes_from_its_checkpoint_and_rejoins(tiny_cfg, tmp_path):
    prep = prepare(tiny_cfg)
    coord = coordinator(prep, tmp_path)
    ckpt = tmp_path / "checkpoints"
    first = trainer(prep, [0, 1, 2, 3], checkpoint_dir=ckpt)
    first.receive(coord.join(first.join_request()))
    while first.epoch < 1:  # epoch 0, exchanging as a worker would
        first.train_window()
        coord.receive(first.report())
        if coord.round_due():
            coord.run_round()
        first.receive(coord.take_mail(first.models))
    first.train_window()  # epoch 1 checkpoints before its first step; then the worker dies
    saved = checkpoint_rows(ckpt)
    again = trainer(prep, [0, 1, 2, 3], checkpoint_dir=ckpt)
    assert (again.reason, again.step, again.epoch) == ("restarted", prep.steps_per_epoch, 1)
    for key, v in again.state()["rows"].items():
        torch.testing.assert_close(v, saved[key])
    drive([again], coord)  # rejoins: the bank's record replaces its older tethers
    coord.history.close()
    assert again.step == prep.steps_per_epoch * tiny_cfg.train.epochs
    assert_bank_matches(coord, [again])
    h = _history(tmp_path)
    assert sorted(e.model for e in h.events("restarted")) == [0, 1, 2, 3]


def checkpoint_rows(ckpt):
    (path,) = ckpt.glob("stack_*.pt")
    return torch.load(path, weights_only=True)["rows"]


def test_member_state_loads_into_a_fresh_module(tiny_cfg):
    prep = prepare(tiny_cfg)
    t = trainer(prep, [0, 3])
    t.train_window()  # trained, not just initialised
    x = torch.as_tensor(prep.data.x_val[:20])
    want = t.stack.forward(x, shared=True).detach()
    for i in range(2):
        m = load_member(tiny_cfg, prep.data.features, prep.data.classes, t.stack.member_state(i))
        torch.testing.assert_close(m(x).detach(), want[i], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_keeps_the_bank(tiny_cfg, tmp_path):
    prep = prepare(with_(tiny_cfg, dynamics=DYNAMICS["fixed"]))
    cpu, gpu = trainer(prep, [0, 1, 2, 3]), trainer(prep, [0, 1, 2, 3], device="cuda")
    for t in (cpu, gpu):
        t.train_window()
    for i in range(4):
        for key, v in cpu.stack.member_state(i).items():
            np.testing.assert_allclose(gpu.stack.member_state(i)[key], v, rtol=1e-4, atol=1e-4)
    coord = coordinator(prep, tmp_path)
    drive([gpu], coord)
    coord.history.close()
    assert_bank_matches(coord, [gpu])


def test_exchanges_that_carry_nothing_are_skipped_and_decide_the_same(tmp_path, monkeypatch):
    """Publishing every 20 steps with an exchange every 5: the three quiet exchanges of
    every four are skipped (one round trip instead of four), and the job decides and trains
    exactly as when every exchange is sent."""
    from ensemble.training.trainer import Trainer

    over = ["policy.name=gravity", "data.groups=2", "data.shift=permute_labels"]
    over += ["trigger.k=20", "trigger.poll_steps=5", "train.epochs=2"]
    prep = prepare(cfg_for(tmp_path, *over))
    sent, out = [], []
    for skip in (True, False):
        if not skip:  # every exchange sent, as before skipping existed
            monkeypatch.setattr(Trainer, "skippable", property(lambda self: False))
        t = trainer(prep, range(4))
        (tmp_path / f"run-{skip}").mkdir()
        c = coordinator(prep, tmp_path / f"run-{skip}")
        calls, report = [], t.report
        t.report = lambda t=t, calls=calls, report=report: (calls.append(t.step), report())[1]
        drive([t], c)
        sent.append(len(calls))
        out.append((c.rounds, c.merges, t.stack.weight("fc1").detach().clone()))
        c.history.close()
    assert out[0][:2] == out[1][:2] and out[0][0] > 0
    assert torch.equal(out[0][2], out[1][2])
    assert sent[0] * 2 < sent[1]  # most exchanges were skipped
