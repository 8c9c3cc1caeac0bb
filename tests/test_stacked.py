"""The stacked trainer: k models as one computation, each training as it would alone."""

import numpy as np
import pytest
import torch

from ensemble.coordinator import Coordinator, apply_instruction
from ensemble.data import load_dataset
from ensemble.history import HistoryReader
from ensemble.model import TetheredMLP, layer_names
from ensemble.policy import Instruction
from ensemble.stacked import StackedMLP, StackedTrainer, resolve_device
from ensemble.training import DirectLink, Trainer, member_seed, model_sizes

SIZES = [12, 16, 8, 5]


def shapes_for(cfg, data):
    sizes = model_sizes(cfg, data)
    names = layer_names(len(sizes) - 1)
    return {n: (o, i) for n, i, o in zip(names, sizes[:-1], sizes[1:], strict=True)}


def with_(cfg, **sections):
    """cfg with section fields replaced: with_(cfg, train={"epochs": 1})."""
    update = {k: getattr(cfg, k).model_copy(update=v) for k, v in sections.items()}
    return cfg.model_copy(update=update)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_init_bit_identical_and_forward_matches_separate_models():
    seeds = [3, 11, 5]
    stacked = StackedMLP(SIZES, "normal", 0.1, seeds)
    singles = [TetheredMLP(SIZES, "normal", 0.1, s) for s in seeds]
    x = torch.randn(3, 7, SIZES[0], generator=torch.Generator().manual_seed(1))  # (k, B, in)
    logits, hidden = stacked.forward_hidden(x)
    shared = stacked(x[0])  # (B, in) shared by every model
    for i, m in enumerate(singles):
        ref = m.state_dict()
        got = stacked.member_state(i)
        assert list(got) == list(ref)
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key].numpy())
        want, want_hidden = m.forward_hidden(x[i])
        close(logits[i].detach(), want.detach(), 1e-6)
        close(shared[i].detach(), m(x[0]).detach(), 1e-6)
        for h, wh in zip(hidden, want_hidden, strict=True):
            close(h[i].detach(), wh.detach(), 1e-6)
    assert stacked.layers["fc1"].weight.shape == (3, 16, 12)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


DYNAMICS = {
    "off": {"mode": "off"},
    "fixed": {"mode": "fixed", "collapse_every": 2, "surge_every": 3, "sparsity": 0.3},
    "entropy-high": {"mode": "entropy", "high_entropy": 0.05, "low_entropy": 0.01, "cooldown": 0},
    "entropy-low": {"mode": "entropy", "high_entropy": 0.999, "low_entropy": 0.99, "cooldown": 0},
}


@pytest.mark.parametrize("dynamics", list(DYNAMICS))
def test_stacked_steps_equal_separate_trainers(tiny_cfg, dynamics):
    cfg = with_(tiny_cfg, dynamics=DYNAMICS[dynamics])
    data = load_dataset(cfg.data, cfg.seed)
    ids = [2, 0, 3]
    st = StackedTrainer(ids, cfg, data, device="cpu")
    singles = [Trainer(m, cfg, data) for m in ids]
    gens = [t.batches() for t in singles]
    for (xb, yb, mask), _ in zip(st.batches(), range(4), strict=False):
        assert mask is None
        losses, norms = st.train_step(xb, yb)
        for i, (t, g) in enumerate(zip(singles, gens, strict=True)):
            x1, y1 = next(g)  # its own shuffle: the same rows as the stacked batch
            np.testing.assert_array_equal(xb[i].numpy(), x1.numpy())
            loss, norm = t.train_step(x1, y1)
            close(losses[i], loss)
            close(norms[i], norm)
            state = st.model.member_state(i)
            for key, v in t.model.state_dict().items():
                close(state[key], v.numpy())
            if t.entropy is None:
                assert st.entropy[i] is None
            else:
                assert st.entropy[i] == pytest.approx(t.entropy, abs=1e-5)
            assert [a.kind for a in st.actions[i]] == [a.kind for a in t.actions]
            got, want = st.probes(i), t.probes()
            assert got.keys() == want.keys()
            for key in ("probe1", "probe2", "sparsity"):
                assert got[key] == pytest.approx(want[key], abs=1e-5)
    if dynamics != "off":
        assert any(st.actions)


def test_unequal_shards_mask_the_short_batch_and_match_trainers(tiny_cfg):
    cfg = with_(tiny_cfg, data={"shard": True})
    data = load_dataset(cfg.data, cfg.seed)
    st = StackedTrainer([0, 1, 2, 3], cfg, data, device="cpu")
    assert len(set(st.n)) > 1  # digits: 270, 269, 269, 269 rows
    singles = [Trainer(m, cfg, data) for m in range(4)]
    masks = []
    for xb, yb, mask in st.batches():  # one epoch, stacked
        losses, norms = st.train_step(xb, yb, mask)
        masks.append(mask)
    assert masks[-1] is not None and masks[-1].sum(1).tolist() == [14, 13, 13, 13]
    for i, t in enumerate(singles):  # the same epoch, one model at a time
        for x1, y1 in t.batches():
            loss, norm = t.train_step(x1, y1)
        close(losses[i], loss)  # the short last batch's mean loss and gradient norm
        close(norms[i], norm)
        state = st.model.member_state(i)
        for key, v in t.model.state_dict().items():
            close(state[key], v.numpy())
    assert st.step == singles[0].step


def test_apply_changes_only_the_models_slice(tiny_cfg):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    st = StackedTrainer([5, 1, 7], tiny_cfg, data, device="cpu")
    lo, hi = tiny_cfg.tether.min, tiny_cfg.tether.max
    for kind, rate in (("merge", 0.5), ("drift", 0.3)):
        before = {n: st.model.layers[n].tether.clone() for n in st.model.names}
        partner = st.model.export_tethers(2)["fc2"] + 0.25
        ins = Instruction(kind, 1, 7, "fc2", rate, 0.0, "test", partner_tether=partner)
        want = apply_instruction(before["fc2"][1].numpy(), ins, lo, hi)
        st.apply([ins])
        np.testing.assert_array_equal(st.model.layers["fc2"].tether[1].numpy(), want)
        assert not np.array_equal(want, before["fc2"][1].numpy())
        for n in st.model.names:
            rows = [0, 2] if n == "fc2" else [0, 1, 2]
            for r in rows:
                assert torch.equal(st.model.layers[n].tether[r], before[n][r])
    assert st.applied == [0, 2, 0]
    with pytest.raises(KeyError):
        st.apply([Instruction("merge", 0, 1, "fc2", 0.5, 0.0, "test", partner_tether=partner)])


class QueuedLink:
    """A coordinator that answers late, like Ray: calls run in the order sent, but a
    readiness check runs at most one queued call (every third check), so replies are still
    in flight at the end of training and mail piles up until `finish`."""

    every = 3

    def __init__(self, coordinator):
        self.c, self.queue, self.checks = coordinator, [], 0

    def call(self, method, *args):
        handle = {"call": (method, args)}
        self.queue.append(handle)
        return handle

    def run_one(self):
        handle = self.queue.pop(0)
        method, args = handle.pop("call")
        handle["out"] = getattr(self.c, method)(*args)

    def ready(self, handle):
        self.checks += 1
        if self.every and self.queue and self.checks % self.every == 0:
            self.run_one()
        return "out" in handle

    def get(self, handle):
        while "out" not in handle:
            self.run_one()
        return handle["out"]


class DeafLink(QueuedLink):
    """Never ready while training: each model's first publication is its only one, and
    every decision reaches the models at the end, through the replies and `finish`."""

    every = 0


@pytest.mark.parametrize(
    "groups, link_type",
    [
        ([[0, 1, 2, 3]], DirectLink),
        ([[2, 0], [3, 1]], DirectLink),
        ([[0, 1, 2, 3]], QueuedLink),
        ([[0, 1, 2, 3]], DeafLink),
    ],
)
def test_stacked_job_records_decisions_and_bank_matches_models(
    tiny_cfg, tmp_path, groups, link_type
):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    coord = Coordinator(
        tiny_cfg, tiny_cfg.job, shapes_for(tiny_cfg, data), str(tmp_path), val_labels=data.y_val
    )
    link = link_type(coord)
    trainers = [StackedTrainer(ids, tiny_cfg, data, device="cpu") for ids in groups]
    gens, results = [t.steps(link) for t in trainers], []
    while gens:  # round-robin, as several stacked workers would overlap
        for g in list(gens):
            try:
                next(g)
            except StopIteration as done:
                results += done.value
                gens.remove(g)
    coord.close()

    for t in trainers:  # every instruction sent was applied: bank == tethers, bit for bit
        for i, m in enumerate(t.ids):
            for layer, arr in t.model.export_tethers(i).items():
                np.testing.assert_array_equal(coord.bank.row(m, layer), arr)
    assert sorted(r.model for r in results) == [0, 1, 2, 3]
    assert {r.steps for r in results} == {trainers[0].step} and trainers[0].step > 0
    for r in results:
        assert r.test_probs.shape == (len(data.y_test), data.classes)
    h = HistoryReader(tmp_path / "history.sqlite")
    assert {p.model for p in h.publications()} == {0, 1, 2, 3}
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
    assert sum(sum(t.applied) for t in trainers) == h.count("instructions") > 0


def test_member_state_loads_into_a_tethered_mlp(tiny_cfg):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    st = StackedTrainer([4, 9], tiny_cfg, data, device="cpu")
    xb, yb, _ = next(st.batches())
    st.train_step(xb, yb)  # trained, not just initialised
    x = torch.as_tensor(data.x_val[:20])
    want = st.model(x).detach()  # (k, 20, C)
    for i, m in enumerate(st.ids):
        single = TetheredMLP(model_sizes(tiny_cfg, data), seed=123)
        single.load_state_dict(
            {k: torch.from_numpy(v) for k, v in st.model.member_state(i).items()}
        )
        close(single(x).detach(), want[i], 1e-6)
        assert member_seed(tiny_cfg, m) != 123
    tethers = st.model.export_tethers(0)
    st.model.import_tethers(1, tethers)
    for n, arr in st.model.export_tethers(1).items():
        np.testing.assert_array_equal(arr, tethers[n])
    with pytest.raises(ValueError):
        st.model.import_tethers(0, {"nope": tethers["fc1"]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_keeps_the_bank(tiny_cfg, tmp_path):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    cpu, gpu = (StackedTrainer([0, 1, 2, 3], tiny_cfg, data, device=d) for d in ("cpu", "cuda"))
    assert gpu.model.layers["fc1"].weight.is_cuda
    for (xc, yc, _), (xg, yg, _), _ in zip(cpu.batches(), gpu.batches(), range(3), strict=False):
        lc, nc = cpu.train_step(xc, yc)
        lg, ng = gpu.train_step(xg, yg)
        close(lc, lg, 1e-4)
        close(nc, ng, 1e-4)
    for i in range(4):
        for key, v in cpu.model.member_state(i).items():
            close(gpu.model.member_state(i)[key], v, 1e-4)
    cfg = with_(tiny_cfg, dynamics=DYNAMICS["fixed"])  # surge-collapse on the GPU's slices too
    coord = Coordinator(cfg, cfg.job, shapes_for(cfg, data), str(tmp_path))
    st = StackedTrainer([0, 1, 2, 3], cfg, data, device="auto")
    assert st.device.type == "cuda"
    results = st.run(DirectLink(coord))
    coord.close()
    for i, r in enumerate(results):
        assert np.isfinite(r.test_probs).all() and not r.failed
        for layer, arr in st.model.export_tethers(i).items():
            np.testing.assert_array_equal(coord.bank.row(r.model, layer), arr)


def test_a_non_finite_model_is_isolated_quarantined_and_stopped(tiny_cfg, tmp_path):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    clean, bad = (StackedTrainer([0, 1, 2, 3], tiny_cfg, data, device="cpu") for _ in range(2))
    with torch.no_grad():
        bad.model.layers["fc1"].weight[1, 0, 0] = float("nan")
    (xb, yb, _), _ = next(clean.batches()), next(bad.batches())
    (lc, nc), (lb, nb) = clean.train_step(xb, yb), bad.train_step(xb, yb)
    assert np.isnan(lb[1]) and np.isnan(nb[1])
    for i in (0, 2, 3):  # the sum of losses keeps the other models' gradients their own
        assert (lb[i], nb[i]) == (lc[i], nc[i])
        for key, v in clean.model.member_state(i).items():
            np.testing.assert_array_equal(bad.model.member_state(i)[key], v)

    coord = Coordinator(tiny_cfg, tiny_cfg.job, shapes_for(tiny_cfg, data), str(tmp_path))
    results = bad.run(DirectLink(coord))
    coord.close()
    assert [r.failed for r in results] == [False, True, False, False]
    for r in results:
        assert np.isfinite(r.test_probs).all() != r.failed
    for i in (0, 2, 3):  # the bank still equals every live model's tethers
        for layer, arr in bad.model.export_tethers(i).items():
            np.testing.assert_array_equal(coord.bank.row(i, layer), arr)
    h = HistoryReader(tmp_path / "history.sqlite")
    assert [e.model for e in h.events("quarantined")] == [1]
    assert [e.model for e in h.events("failed")] == [1]
    assert sorted(e.model for e in h.events("finished")) == [0, 2, 3]
    assert {m.model for m in h.metrics()} == {0, 2, 3}
    assert 1 not in {p.model for p in h.publications()}


def test_a_restarted_stack_resumes_from_its_checkpoint_and_rejoins(tiny_cfg, tmp_path):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    coord = Coordinator(tiny_cfg, tiny_cfg.job, shapes_for(tiny_cfg, data), str(tmp_path))
    link, ckpt = DirectLink(coord), tmp_path / "checkpoints"
    first = StackedTrainer([0, 1, 2, 3], tiny_cfg, data, device="cpu", checkpoint_dir=ckpt)
    gen = first.steps(link)
    while next(gen) < 17:  # the end of epoch 0; epoch 1 checkpoints before its first step
        pass
    saved = [first.model.member_state(i) for i in range(4)]
    shuffles = [g.get_state() for g in first.gens]
    while next(gen) < 20:  # into epoch 1, then the worker dies
        pass
    assert first.step == 20

    again = StackedTrainer([0, 1, 2, 3], tiny_cfg, data, device="cpu", checkpoint_dir=ckpt)
    assert (again.rejoin, again.step, again.epoch) == ("restarted", 17, 1)
    for i in range(4):
        for key, v in saved[i].items():
            np.testing.assert_array_equal(again.model.member_state(i)[key], v)
        assert torch.equal(again.gens[i].get_state(), shuffles[i])
    bank = [coord.tethers(i) for i in range(4)]  # ahead of the checkpoint's tethers
    assert any(
        not np.array_equal(bank[i][n], saved[i][f"layers.{n}.tether"])
        for i in range(4)
        for n in bank[i]
    )
    gen = again.steps(link)
    assert next(gen) == 18  # rejoined before its first step: it holds the bank's record
    for i in range(4):
        for layer, arr in again.model.export_tethers(i).items():
            np.testing.assert_array_equal(bank[i][layer], arr)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            results = done.value
            break
    coord.close()
    assert [r.steps for r in results] == [34] * 4
    for i in range(4):  # rejoined: the bank is what the models hold, bit for bit
        for layer, arr in again.model.export_tethers(i).items():
            np.testing.assert_array_equal(coord.bank.row(i, layer), arr)
    h = HistoryReader(tmp_path / "history.sqlite")
    assert sorted(e.model for e in h.events("restarted")) == [0, 1, 2, 3]
