"""One model's training loop, plain Python. Talks to the coordinator through a `Link`.

The loop never waits on a round trip per step: it keeps at most one call in flight, checks
it without blocking at each step boundary, and applies instructions when they arrive.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ensemble import checkpoint, maths
from ensemble.config import Config
from ensemble.coordinator import TetherReport, apply_instruction
from ensemble.data import Dataset
from ensemble.dynamics import Action, SurgeCollapse, activation_entropy
from ensemble.model import TetheredMLP, hidden_sizes
from ensemble.policy import Instruction
from ensemble.triggers import make_trigger


class Link(Protocol):
    """How a trainer reaches the coordinator; Ray's version lives in workers/."""

    def call(self, method: str, *args: Any) -> Any: ...  # start a call, return a handle
    def ready(self, handle: Any) -> bool: ...  # non-blocking
    def get(self, handle: Any) -> Any: ...  # blocking


class DirectLink:
    """In-process link to a plain Coordinator object (tests, benchmarks)."""

    def __init__(self, coordinator):
        self.c = coordinator

    def call(self, method, *args):
        return getattr(self.c, method)(*args)

    def ready(self, handle):
        return True

    def get(self, handle):
        return handle


@dataclass(frozen=True)
class MemberResult:
    """What a finished worker hands back to the driver."""

    model: int
    steps: int
    test_probs: np.ndarray  # (N_test, C) float32
    weights: dict[str, np.ndarray]  # state_dict as numpy, tethers included
    blocked_seconds: float  # time spent in calls to the coordinator (0 for a DirectLink)
    train_seconds: float
    failed: bool = False  # stopped after a non-finite loss: not an ensemble member


def model_sizes(cfg: Config, data: Dataset) -> list[int]:
    return [data.features, *hidden_sizes(cfg.model.preset, cfg.model.layers), data.classes]


def member_seed(cfg: Config, model: int) -> int:
    return cfg.seed * 100_003 + model


def init_seeds(cfg: Config, model: int) -> tuple[int, int]:
    """Seeds of a model's weight init and tether init. With a shared init every model starts
    from model 0's weights; tethers stay its own, so drift has something to push apart."""
    own = member_seed(cfg, model)
    return (member_seed(cfg, 0) if cfg.model.init == "shared" else own), own + 7919


def probe_batch(cfg: Config, data: Dataset) -> np.ndarray:
    """The fixed inputs on which function-space compatibility compares models: the first
    compat.probe_size validation samples (all of them when the split is smaller)."""
    return data.x_val[: cfg.compat.probe_size]


def output_grams(names: list[str], outs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """layer -> centred Gram of its outputs on the probe batch (hidden layers, then logits)."""
    return {n: maths.centered_gram(h) for n, h in zip(names, outs, strict=True)}


def needs_weights(cfg: Config) -> bool:
    """Whether publications carry the tethered weights (alignment or weight merge)."""
    return cfg.policy.align or cfg.policy.merge == "weights"


class Trainer:
    def __init__(
        self,
        model: int,
        cfg: Config,
        data: Dataset,
        checkpoint_dir: Path | None = None,
        resumed: bool = False,
        device: str = "cpu",
    ):
        """checkpoint_dir: where to checkpoint each epoch; an existing checkpoint there is
        loaded, and the trainer rejoins the coordinator ('resumed' or 'restarted').
        device: where the model and its data live ('cpu' or 'cuda')."""
        self.id = model
        self.cfg = cfg
        self.data = data
        seed = member_seed(cfg, model)
        self.device = torch.device(device)
        w_seed, t_seed = init_seeds(cfg, model)
        self.model = TetheredMLP(
            model_sizes(cfg, data), cfg.tether.init, cfg.tether.std, w_seed, t_seed
        )
        self.model.to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.trigger = make_trigger(cfg.trigger)
        self.gen = torch.Generator().manual_seed(seed)
        x, y = data.x_train, data.y_train
        if cfg.data.shard:  # a disjoint slice per model
            x, y = x[model :: cfg.models.count], y[model :: cfg.models.count]
        # own, writable copies, on the device
        self.x, self.y = torch.tensor(x, device=self.device), torch.tensor(y, device=self.device)
        self.probe = torch.tensor(probe_batch(cfg, data), device=self.device)
        self.rejected = 0  # merges undone by the merge guard
        self.step = 0
        self.applied = 0
        on = cfg.dynamics.mode != "off"
        self.dynamics = SurgeCollapse(cfg.dynamics, seed) if on else None
        self.entropy: float | None = None  # latest mean activation entropy
        self.actions: list[Action] = []  # surge-collapse actions not yet reported
        self.epoch = 0  # the epoch to train next
        self.rollbacks = 0
        self.failed = False
        self.ckpt = None if checkpoint_dir is None else checkpoint.path_for(checkpoint_dir, model)
        self.rejoin: str | None = None  # why to resync with the coordinator before training
        if self.ckpt is not None and self.load_checkpoint():
            self.rejoin = "resumed" if resumed else "restarted"

    def save_checkpoint(self) -> None:
        if self.ckpt is None:
            return
        checkpoint.save_training(
            self.ckpt,
            self.model,
            self.opt,
            self.step,
            self.epoch,
            gen=self.gen.get_state(),
            trigger=[self.trigger.prev_loss, self.trigger.last_fired],
            rollbacks=self.rollbacks,
        )

    def load_checkpoint(self) -> bool:
        state = checkpoint.restore_training(self.ckpt, self.model, self.opt)
        if state is None:
            return False
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.gen.set_state(state["gen"])
        self.trigger.prev_loss, self.trigger.last_fired = state["trigger"]
        self.rollbacks = max(self.rollbacks, int(state["rollbacks"]))
        return True

    def batches(self):
        perm = torch.randperm(len(self.x), generator=self.gen).to(self.device)
        bs = self.cfg.train.batch_size
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            yield self.x[idx], self.y[idx]

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, float]:
        self.model.train()
        dyn = self.dynamics
        if dyn is not None:
            xb = dyn.input_noise(self.step + 1, xb)
        logits, hidden = self.model.forward_hidden(xb)
        loss = F.cross_entropy(logits, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads))
        self.opt.step()
        self.step += 1
        if dyn is not None and math.isfinite(float(loss.detach())):  # NaN: poison handles it
            bins = self.cfg.dynamics.bins
            ents = [activation_entropy(h, bins) for h in hidden]
            self.entropy = sum(ents) / len(ents) if ents else None
            self.actions += dyn.act(self.step, self.model.weight_matrices(), ents)
        return float(loss.detach()), grad_norm

    @torch.no_grad()
    def apply(self, instructions: list[Instruction]) -> None:
        """Apply instructions in the order decided, at a step boundary."""
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        for ins in instructions:
            assert ins.model == self.id, (ins.model, self.id)
            layer = self.model.layers[ins.layer]
            old = layer.tether.detach().cpu().numpy()
            new = apply_instruction(old, ins, lo, hi)
            if ins.kind == "merge" and ins.partner_weights is not None:
                lin = layer.linear
                w, b = lin.weight.detach().cpu().numpy(), lin.bias.detach().cpu().numpy()
                pw, pb = ins.partner_weights
                lin.weight.copy_(torch.from_numpy(maths.merge_weights(w, old, new, pw, ins.rate)))
                lin.bias.copy_(torch.from_numpy(maths.merge(b, pb, ins.rate)))
            layer.tether.copy_(torch.from_numpy(new))  # to the buffer's device
            self.applied += 1

    def receive(self, link: Link, mail: list[Instruction]) -> None:
        """Apply mail; with the merge guard on, undo its merges if they raised the model's
        validation loss (the greedy-soup rule) and tell the coordinator they were rejected."""
        merges = [i for i in mail if i.kind == "merge"]
        if not (self.cfg.policy.guard and merges):
            self.apply(mail)
            return
        before = self.evaluate(self.data.x_val, self.data.y_val)[0]
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.apply(mail)
        after = self.evaluate(self.data.x_val, self.data.y_val)[0]
        if after <= before:
            return
        self.model.load_state_dict(saved)
        self.apply([i for i in mail if i.kind != "merge"])
        self.rejected += len(merges)
        tethers = self.model.export_tethers()
        link.get(link.call("reject", self.id, self.step, merges, before, after, tethers))

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        x = torch.as_tensor(np.array(x), device=self.device)
        return torch.softmax(self.model(x), dim=1).cpu().numpy()

    @torch.no_grad()
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        self.model.eval()
        logits = self.model(torch.as_tensor(np.array(x), device=self.device))
        yt = torch.as_tensor(np.array(y), device=self.device)
        return float(F.cross_entropy(logits, yt)), float((logits.argmax(1) == yt).float().mean())

    def report(self, epoch: int, loss: float, grad_norm: float) -> TetherReport:
        return TetherReport(
            self.id,
            self.step,
            epoch,
            loss,
            grad_norm,
            self.model.export_tethers(),
            self.probes(),
            self.features(),
            self.tethered_weights(),
        )

    @torch.no_grad()
    def features(self) -> dict[str, np.ndarray] | None:
        """compat.fn cka: each layer's centred output Gram on the probe batch."""
        if self.cfg.compat.fn != "cka":
            return None
        self.model.eval()
        logits, hidden = self.model.forward_hidden(self.probe)
        return output_grams(self.model.names, [h.cpu().numpy() for h in (*hidden, logits)])

    def tethered_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        if not needs_weights(self.cfg):
            return None
        return self.model.tethered_weights()

    def probes(self) -> dict[str, float | None]:
        p1, p2 = self.model.probes()
        ws = self.model.weight_matrices().values()
        zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        return {"probe1": p1, "probe2": p2, "entropy": self.entropy, "sparsity": zeros}

    def run(self, link: Link) -> MemberResult:
        """Train every epoch, publishing on trigger and applying instructions as they come."""
        gen = self.steps(link)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value

    def steps(self, link: Link) -> Generator[int, None, MemberResult]:
        """`run`, one training step per `next()`; lets tests interleave trainers in-process.

        Checkpoints at each epoch start. A non-finite loss quarantines the model: it rolls
        back to that checkpoint (at most `faults.max_rollbacks` times) or stops.
        """
        t0 = time.perf_counter()
        inflight, last_call = None, self.step
        poll_steps = self.cfg.trigger.poll_steps
        if self.rejoin:  # older tethers than the coordinator's: take its record
            self.apply(link.get(link.call("rejoin", self.id, self.step, self.rejoin)))
        while self.epoch < self.cfg.train.epochs and not self.failed:
            epoch = self.epoch
            self.save_checkpoint()
            poisoned = False
            for xb, yb in self.batches():
                loss, grad_norm = self.train_step(xb, yb)
                for a in self.actions:  # failures and dynamics are data: record them
                    link.get(link.call("record_event", a.kind, self.id, a.step, a.detail))
                self.actions = []
                if inflight is not None and link.ready(inflight):
                    self.receive(link, link.get(inflight))
                    inflight = None
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    if inflight is not None:  # settle the call before rewinding
                        link.get(inflight)
                        inflight = None
                    poisoned = True
                    self.on_poison(link, loss)
                    break
                fired = self.trigger.check(self.step, loss, grad_norm)
                if inflight is None:
                    if fired:
                        inflight = link.call("publish", self.report(epoch, loss, grad_norm))
                        last_call = self.step
                    elif self.step - last_call >= poll_steps:
                        inflight = link.call("poll", self.id)
                        last_call = self.step
                yield self.step
            if poisoned:
                continue  # rolled back (same epoch again) or failed (loop ends)
            for split, (x, y) in {
                "train": (self.data.x_train, self.data.y_train),
                "val": (self.data.x_val, self.data.y_val),
            }.items():
                link.get(link.call("record_metrics", self.id, epoch, split, *self.evaluate(x, y)))
            link.get(
                link.call("record_val_probs", self.id, epoch, self.predict_proba(self.data.x_val))
            )
            self.epoch = epoch + 1
        if inflight is not None:
            self.receive(link, link.get(inflight))
        self.receive(link, link.get(link.call("finish", self.id, self.step, self.failed)))
        return MemberResult(
            self.id,
            self.step,
            self.predict_proba(self.data.x_test),
            self.model.weights(),
            getattr(link, "blocked", 0.0),
            time.perf_counter() - t0,
            self.failed,
        )

    def on_poison(self, link: Link, loss: float) -> None:
        """Quarantine; then roll back to the epoch's checkpoint and resync, or stop."""
        reason = f"loss is {loss}" if not math.isfinite(loss) else "gradient is not finite"
        link.get(link.call("quarantine", self.id, self.step, reason))
        f = self.cfg.faults
        if f.on_poison == "rollback" and self.rollbacks < f.max_rollbacks and self.ckpt:
            self.rollbacks += 1
            self.load_checkpoint()
            self.apply(link.get(link.call("rejoin", self.id, self.step, "rolled_back")))
        else:
            self.failed = True


def interleave(trainers: list[Trainer], link: Link) -> list[MemberResult]:
    """Run trainers round-robin, one step each in turn, in this process (no Ray)."""
    gens = {t.id: t.steps(link) for t in trainers}
    results: dict[int, MemberResult] = {}
    while gens:
        for model, gen in list(gens.items()):
            try:
                next(gen)
            except StopIteration as done:
                results[model] = done.value
                del gens[model]
    return [results[m] for m in sorted(results)]
