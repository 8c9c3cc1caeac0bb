"""k models (k = 1 included) trained as one stacked computation: the step loop.

Per step it only computes: the losses and gradient norms stay on the device. Every
`trigger.poll_steps` steps, and at each epoch's end, it reaches an exchange boundary: it
reads the window of losses once, quarantines and rolls back a model whose loss blew up,
evaluates every model's trigger as arrays, and gathers in its outbox what the next report
carries. Its evaluation is a `Validation` (ensemble.training.validation), its checkpoints
and rollback snapshot a `Checkpoints` (ensemble.training.checkpoint). `Trainer`
(ensemble.training.trainer) adds the exchange with the coordinator.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ensemble.config import Config
from ensemble.data.datasets import Dataset
from ensemble.protocol import EpochReport, Event, Rejection
from ensemble.training import checkpoint
from ensemble.training.batches import Batches
from ensemble.training.dynamics import SurgeCollapse, activation_entropy
from ensemble.training.model import build_member, member_seed
from ensemble.training.stack import Stack, cross_entropy
from ensemble.training.triggers import Triggers
from ensemble.training.validation import Validation, evaluate

TRAITS = ("coordinates", "guard", "weights", "compat", "outputs")  # policies' traits()


class StepLoop:
    """A stack of models, its optimiser, data and batches, and the loop that trains it."""

    def __init__(
        self,
        ids: list[int],
        cfg: Config,
        data: Dataset,
        rows: list[np.ndarray],
        steps_per_epoch: int,
        device: str = "cpu",
        checkpoint_dir: Path | None = None,
        resumed: bool = False,
        val_rows: list[np.ndarray] | None = None,
        traits: dict[str, bool] | None = None,
    ):
        """ids: the models of this stack; rows: each one's training rows (indices into
        data.x_train); steps_per_epoch: the job's, the same for every model; val_rows:
        each one's validation rows (indices into data.x_val), None: all of them.
        traits: what the job's policy needs of a worker (its `traits`: coordinates,
        compat, outputs, weights, guard); None: nothing, models train alone.
        checkpoint_dir: where the stack checkpoints at each epoch start; an existing
        checkpoint there is loaded and the stack rejoins ('resumed' or 'restarted')."""
        if not ids or len(set(ids)) != len(ids) or len(rows) != len(ids):
            raise ValueError(f"ids must be distinct model ids with rows each, got {ids}")
        self.ids, self.k, self.cfg, self.data = list(ids), len(ids), cfg, data
        self.models = np.array(ids, dtype=np.int64)
        self.row = {m: i for i, m in enumerate(self.ids)}
        self.device = dev = torch.device(device)
        built = [build_member(cfg, data.features, data.classes, m) for m in ids]
        self.stack = Stack([b[0] for b in built], [b[1] for b in built]).to(dev)
        self.layers = self.stack.layers
        self.opt = torch.optim.Adam(self.stack.parameters(), lr=cfg.train.lr, fused=True)
        seeds = [member_seed(cfg.seed, m) for m in ids]
        self.batches = Batches(rows, cfg.train.batch_size, steps_per_epoch, seeds)
        self.steps_per_epoch = steps_per_epoch
        self.x = torch.tensor(np.asarray(data.x_train), device=dev)
        self.y = torch.tensor(np.asarray(data.y_train), device=dev)
        self.validation = Validation(
            self.stack, data.x_val, data.y_val, dev, val_rows, cfg.compat.probe_size
        )
        self.triggers = Triggers(cfg.trigger, self.k)
        on = cfg.dynamics.mode != "off"
        self.dynamics = [SurgeCollapse(cfg.dynamics, s) for s in seeds] if on else None
        self.traits = traits or dict.fromkeys(TRAITS, False)  # what the policy needs
        self.coordinated = self.traits["coordinates"]  # else: no features, weights
        self.start_loop()
        self.start_members()
        self.outbox = Outbox(self.k)
        path = None if checkpoint_dir is None else checkpoint.stack_path(checkpoint_dir, self.ids)
        every = cfg.faults.checkpoint_seconds
        self.checkpoints = checkpoint.Checkpoints(self.stack, self.opt, path, every)
        self.reason = "started"  # why the stack joins the coordinator
        if self.load_checkpoint():
            self.reason = "resumed" if resumed else "restarted"

    def start_loop(self) -> None:
        """The step loop's state: where it is, and the window of losses on the device."""
        dev, k = self.device, self.k
        self.step = 0  # steps every model of the stack has taken
        self.epoch = 0  # the epoch being trained
        self.pos = 0  # steps into it
        self.index: torch.Tensor | None = None  # (k, steps * B) rows of this epoch
        self.window = torch.zeros((self.cfg.trigger.poll_steps, k), device=dev)  # losses
        self.extra = torch.zeros((2, k), device=dev)  # the window's last step: norm, acc
        self.filled = 0  # steps of the window trained since the last boundary
        self.running = np.zeros((4, k))  # this epoch's: loss, accuracy, windows, steps

    def start_members(self) -> None:
        """Per model (row i of each array): how it is doing, beside its parameters."""
        k = self.k
        self.last = np.full((2, k), np.nan)  # latest loss and gradient norm
        self.entropy = np.full(k, np.nan)  # latest mean activation entropy
        self.failed = np.zeros(k, dtype=bool)  # stopped after a non-finite loss
        self.rollbacks = np.zeros(k, dtype=np.int64)
        self.rejected = np.zeros(k, dtype=np.int64)  # merges the guard undid
        self.introduced = np.zeros(k, dtype=bool)  # the coordinator holds its tethers
        self.final_published = False  # the last report publishes every final state

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs or bool(self.failed.all())

    # --- training ------------------------------------------------------------------
    def train_window(self) -> None:
        """Train up to the next exchange boundary: a multiple of `poll_steps`, or the
        epoch's end. Then read the window once: poison, triggers, epoch scores."""
        if self.done:
            return
        if self.pos == 0:
            self.begin_epoch()
        poll = self.cfg.trigger.poll_steps
        n = min(poll - self.step % poll, self.steps_per_epoch - self.pos)
        for j in range(n):
            self.train_step(last=j == n - 1)
        self.close_window()
        if self.pos == self.steps_per_epoch:
            self.end_epoch()

    def begin_epoch(self) -> None:
        self.save_checkpoint()
        self.checkpoints.take_snapshot()
        self.index = self.batches.epoch().to(self.device)

    def train_step(self, last: bool = False) -> None:
        """One step of every model. Only its losses are kept per step, on the device; the
        last step of a window also keeps each model's gradient norm and batch accuracy."""
        b = self.cfg.train.batch_size
        idx = self.index[:, self.pos * b : (self.pos + 1) * b]  # (k, B)
        xb, yb = self.x[idx], self.y[idx]  # (k, B, F), (k, B)
        if self.dynamics is not None:
            xb = self.input_noise(xb)
        logits, taps = self.stack.forward_taps(xb)  # (k, B, C)
        losses = cross_entropy(logits, yb)  # (k,)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # d(sum)/dW_i = d(loss_i)/dW_i
        with torch.no_grad():
            self.window[self.filled] = losses.detach()
            if last:  # (2, k): gradient norm and accuracy, on the window's last step
                grads = torch.cat([p.grad.flatten(1) for p in self.stack.params.values()], 1)
                norms = torch.linalg.vector_norm(grads, dim=1)
                self.extra = torch.stack([norms, (logits.argmax(2) == yb).sum(1) / b])
        self.opt.step()
        self.step += 1
        self.pos += 1
        self.filled += 1
        if self.dynamics is not None:
            self.surge_collapse(taps[:-1], losses)

    def close_window(self) -> None:
        """The boundary: one read of the window's (W, k) losses, and of its last step's
        gradient norms and accuracies (the gradient half of the plateau test runs there)."""
        losses = self.window[: self.filled].cpu().numpy().astype(np.float64)  # (W, k)
        norm, acc = self.extra.cpu().numpy().astype(np.float64)  # (k,) each
        steps = np.arange(self.step - self.filled + 1, self.step + 1)
        norms = np.full_like(losses, np.nan)
        norms[-1] = norm
        w = len(losses)  # accuracy: one batch a window, a sample of the epoch's batches
        self.running += [losses.sum(0), acc, np.ones(self.k), np.full(self.k, w)]
        self.filled = 0
        self.outbox.epoch = self.epoch
        bad = ~(np.isfinite(losses).all(0) & np.isfinite(norm)) & ~self.failed
        for i in np.flatnonzero(bad):
            self.poison(int(i), losses[:, i], norms[:, i])
        fired = self.triggers.check(steps, losses, norms) & ~self.failed & ~bad
        self.outbox.published |= fired
        self.last = np.stack([losses[-1], norm])
        t = self.cfg.trigger  # every k steps: a window without a multiple of k publishes
        quiet = t.name == "every_k_steps" and not (steps % t.k == 0).any()
        self.outbox.quiet = self.outbox.quiet and bool(quiet)

    def end_epoch(self) -> None:
        """Training scores are the epoch's running means over its own batches; validation
        is one evaluation pass for the whole stack. The scores ride the next report."""
        live = ~self.failed
        loss, acc, windows, steps = np.maximum(self.running, [[-np.inf], [-np.inf], [1], [1]])
        train = np.stack([loss / steps, acc / windows], 1)  # (k, 2)
        self.running = np.zeros((4, self.k))
        val, probs = self.validation.whole()
        if self.own_val is not None:
            val = self.validation.own()
        self.outbox.epoch_report = EpochReport(
            self.epoch, self.models[live], train[live], val[live], probs[live]
        )
        self.epoch += 1
        self.pos = 0

    def poison(self, i: int, losses: np.ndarray, norms: np.ndarray) -> None:
        """Model i's loss or gradient is not finite: quarantine it, then roll back only its
        slices (weights, tethers, Adam state) to the epoch's start, or stop it."""
        m = self.ids[i]
        loss = next((x for x in losses if not math.isfinite(x)), None)
        why = f"loss is {loss}" if loss is not None else "gradient is not finite"
        self.outbox.events.append(Event("quarantined", m, self.step, {"reason": why}))
        self.outbox.published[i] = False  # what it would have published is gone
        f = self.cfg.faults
        if f.on_poison == "rollback" and self.rollbacks[i] < f.max_rollbacks and self.snapshot:
            self.rollbacks[i] += 1
            self.checkpoints.roll_back(i)
            self.running[:, i] = 0  # its training scores count from the rollback on
            self.outbox.rejoined.append((m, "rolled_back"))
        else:
            self.failed[i] = True

    # --- evaluation (ensemble.training.validation) -------------------------------------
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, probs: bool = False):
        """(k, 2) loss and accuracy of every model on the shared x (N, ...), y (N,); with
        probs=True also their class probabilities (k, N, C)."""
        return evaluate(self.stack, x, y, probs)

    def evaluate_own_val(self) -> np.ndarray:
        """(k, 2) loss and accuracy of each model on its own validation rows."""
        return self.validation.own()

    @property
    def own_val(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per model (index (k, V), mask (k, V)) of its validation rows; None: all of them."""
        return self.validation.own_rows

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(k, N, C): every model's probabilities on the shared x (N, ...)."""
        x = torch.tensor(np.asarray(x), device=self.device)  # a copy: x may be read-only
        logits = self.stack.forward(x, shared=True)
        return torch.softmax(logits, 2).cpu().numpy()

    # --- state: checkpoints, snapshots, rollback (ensemble.training.checkpoint) --------
    def state(self, copy: bool = False) -> dict:
        """The stack's training state: parameters, tethers and Adam's moments."""
        return self.checkpoints.state(copy)

    @property
    def snapshot(self) -> dict | None:
        """The stack at this epoch's start (rollback)."""
        return self.checkpoints.snapshot

    def save_checkpoint(self) -> None:
        """At an epoch start, once `faults.checkpoint_seconds` have passed since the last."""
        self.checkpoints.save(
            lambda: {
                "step": self.step,
                "epoch": self.epoch,
                "batches": self.batches.state(),
                "triggers": self.triggers.state(),
                "failed": self.failed.tolist(),
                "rollbacks": self.rollbacks.tolist(),
            }
        )

    def load_checkpoint(self) -> bool:
        state = self.checkpoints.load()
        if state is None:
            return False
        self.step, self.epoch, self.pos = int(state["step"]), int(state["epoch"]), 0
        self.batches.load(state["batches"])
        self.triggers.load(state["triggers"])
        self.failed = np.array(state["failed"], dtype=bool)
        self.rollbacks = np.array(state["rollbacks"], dtype=np.int64)
        return True

    # --- surge-collapse ---------------------------------------------------------------
    def input_noise(self, xb: torch.Tensor) -> torch.Tensor:
        """Per model, its own noise stream, while its low-entropy episode lasts."""
        xb = xb.clone()  # (k, B, F): the data stays as it was
        for i, d in enumerate(self.dynamics):
            xb[i] = d.input_noise(self.step + 1, xb[i].cpu()).to(xb.device)
        return xb

    def surge_collapse(self, hidden: list[torch.Tensor], losses: torch.Tensor) -> None:
        """Each model's entropy and actions on its own W (a per-step read: dynamics only)."""
        bins, ok = self.cfg.dynamics.bins, torch.isfinite(losses).tolist()
        for i, d in enumerate(self.dynamics):
            if self.failed[i] or not ok[i]:
                continue  # histc cannot bin NaN; the boundary quarantines it
            ents = [activation_entropy(h[i], bins) for h in hidden]
            self.entropy[i] = sum(ents) / len(ents) if ents else np.nan
            ws = {n: self.stack.weight(n).data[i].cpu() for n in self.layers}  # views on cpu
            for a in d.act(self.step, ws, ents):
                self.outbox.events.append(Event(a.kind, self.ids[i], a.step, a.detail))
            if self.device.type != "cpu":
                for n, w in ws.items():
                    self.stack.weight(n).data[i].copy_(w)


class Outbox:
    """What the next report carries, gathered since the last one."""

    def __init__(self, k: int):
        self.published = np.zeros(k, dtype=bool)
        self.events: list[Event] = []
        self.rejections: list[Rejection] = []
        self.rejoined: list[tuple[int, str]] = []
        self.staleness: list[int] = []  # steps between each applied instruction's decision and now
        self.quiet = True  # every window since the last report could not publish
        self.epoch_report: EpochReport | None = None
        self.epoch = 0
