"""The one trainer: k models (k = 1 included) trained as one stacked computation.

Per step it only computes: the losses and gradient norms stay on the device. Every
`trigger.poll_steps` steps, and at each epoch's end, it reaches an exchange boundary: it
reads the window of losses once, quarantines and rolls back a model whose loss blew up,
evaluates every model's trigger as arrays, and its `report()` carries everything the
coordinator should know about the stack, in one message. `receive()` applies the reply,
with the merge guard. `run_stack` is the loop around it; the Ray worker and the in-process
job (`ensemble.runtime.job.run_local`) both drive a Trainer through these few methods.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ensemble.config import Config
from ensemble.data.datasets import Dataset
from ensemble.outputs.evaluation import score
from ensemble.protocol import (
    EpochReport,
    Event,
    Instruction,
    JoinRequest,
    MemberResult,
    Rejection,
    Reply,
    StackReport,
    apply_instruction,
    merge_weights,
)
from ensemble.training import checkpoint
from ensemble.training.batches import Batches
from ensemble.training.dynamics import SurgeCollapse, activation_entropy
from ensemble.training.model import build_member, member_seed
from ensemble.training.stack import Stack, cross_entropy
from ensemble.training.triggers import Triggers

TRAITS = ("coordinates", "guard", "weights", "compat", "outputs")  # policies' traits()


class Trainer:
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
        as_t = lambda a: torch.tensor(np.asarray(a), device=dev)  # noqa: E731
        self.x, self.y = as_t(data.x_train), as_t(data.y_train)
        self.x_val, self.y_val = as_t(data.x_val), as_t(data.y_val)
        self.probe = as_t(data.x_val[: cfg.compat.probe_size])  # the fixed probe batch
        self.own_val = None  # per model (index (k, V), mask (k, V)) when not all of x_val
        if val_rows is not None:
            longest = max(len(v) for v in val_rows)
            index = np.zeros((self.k, longest), dtype=np.int64)
            mask = np.zeros((self.k, longest), dtype=bool)
            for i, v in enumerate(val_rows):
                index[i, : len(v)], mask[i, : len(v)] = v, True
            self.own_val = (as_t(index), as_t(mask))
        self.triggers = Triggers(cfg.trigger, self.k)
        on = cfg.dynamics.mode != "off"
        self.dynamics = [SurgeCollapse(cfg.dynamics, s) for s in seeds] if on else None
        self.entropy = np.full(self.k, np.nan)  # latest mean activation entropy
        self.step = 0  # steps every model of the stack has taken
        self.epoch = 0  # the epoch being trained
        self.pos = 0  # steps into it
        self.index: torch.Tensor | None = None  # (k, steps * B) rows of this epoch
        self.window = torch.zeros((cfg.trigger.poll_steps, self.k), device=dev)  # losses
        self.extra = torch.zeros((2, self.k), device=dev)  # the window's last step: norm, acc
        self.running = np.zeros((4, self.k))  # this epoch's: loss, accuracy, windows, steps
        self.traits = traits or dict.fromkeys(
            TRAITS, False
        )  # what the policy needs: coordinates, weights, guard
        self.coordinated = self.traits["coordinates"]  # else: no features, weights
        self.filled = 0  # steps of the window trained since the last boundary
        self.last = np.full((2, self.k), np.nan)  # latest loss and gradient norm
        self.failed = np.zeros(self.k, dtype=bool)  # stopped after a non-finite loss
        self.rollbacks = np.zeros(self.k, dtype=np.int64)
        self.rejected = np.zeros(self.k, dtype=np.int64)  # merges the guard undid
        self.introduced = np.zeros(self.k, dtype=bool)  # the coordinator holds its tethers
        self.final_published = False  # the last report publishes every final state
        self.snapshot: dict | None = None  # the stack at this epoch's start (rollback)
        self.outbox = Outbox(self.k)
        self.ckpt = None
        self.saved_at = -math.inf  # when the last checkpoint was written (monotonic)
        if checkpoint_dir is not None:
            self.ckpt = checkpoint.stack_path(Path(checkpoint_dir), self.ids)
        self.reason = "started"  # why the stack joins the coordinator
        if self.ckpt is not None and self.load_checkpoint():
            self.reason = "resumed" if resumed else "restarted"

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs or bool(self.failed.all())

    # --- training --------------------------------------------------------------------
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
        self.snapshot = self.state(copy=True)
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
        val, probs = self.evaluate(self.x_val, self.y_val, probs=True)  # the whole split
        if self.own_val is not None:
            val = self.evaluate_own_val()
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
            self.restore_row(i, self.snapshot)
            self.running[:, i] = 0  # its training scores count from the rollback on
            self.outbox.rejoined.append((m, "rolled_back"))
        else:
            self.failed[i] = True

    # --- the coordinator's instructions ----------------------------------------------
    def receive(self, reply: Reply) -> None:
        """Apply the reply. With the merge guard on, undo a model's merges if they raised
        its validation loss (the greedy-soup rule); the rejection rides the next report."""
        for m in reply.unknown:  # a restarted coordinator lost them: introduce them again
            self.introduced[self.row[m]] = False
        mail = [ins for ins in reply.instructions if not self.failed[self.row[ins.model]]]
        merges = [ins for ins in mail if ins.kind == "merge"]
        if not (self.traits["guard"] and merges):
            self.apply(mail)
            return
        rows = sorted({self.row[ins.model] for ins in merges})
        index = torch.tensor(rows, device=self.device)
        before = self.evaluate_own_val()[:, 0]
        saved = self.stack.rows(index)  # copies: fancy indexing
        self.apply(mail)
        after = self.evaluate_own_val()[:, 0]
        for j, i in enumerate(rows):
            if not after[i] > before[i]:
                continue
            self.stack.set_rows(i, {key: v[j] for key, v in saved.items()})
            m = self.ids[i]
            self.apply([ins for ins in mail if ins.model == m and ins.kind != "merge"])
            mine = tuple(ins for ins in merges if ins.model == m)
            self.rejected[i] += len(mine)
            tethers = {n: t[i].cpu().numpy().copy() for n, t in self.stack.tethers.items()}
            rejection = Rejection(m, self.step, mine, float(before[i]), float(after[i]), tethers)
            self.outbox.rejections.append(rejection)

    @torch.no_grad()
    def apply(self, instructions: list[Instruction]) -> None:
        """Apply instructions in the order decided, each to its model's slice."""
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        for ins in instructions:
            i = self.row[ins.model]
            t = self.stack.tethers[ins.layer][i]  # a view
            old = t.cpu().numpy().copy()
            new = apply_instruction(old, ins, lo, hi)
            if ins.kind == "merge" and ins.partner_weights is not None:
                w, b = self.stack.weight(ins.layer)[i], self.stack.params[f"{ins.layer}.bias"][i]
                # copies: Ray hands over read-only arrays
                dw, db = (
                    torch.as_tensor(np.array(d), device=w.device) for d in ins.partner_weights
                )
                if ins.share == "both":  # W * T moves by rate * (partner's - own)
                    merged = merge_weights(
                        w.cpu().numpy(), old, new, ins.partner_weights[0], ins.rate
                    )
                    w.copy_(torch.from_numpy(merged))
                else:  # weights: W moves, the tether stays the model's own
                    w.add_(dw, alpha=ins.rate)
                b.add_(db, alpha=ins.rate)
            t.copy_(torch.from_numpy(new))
            if ins.step is not None:
                self.outbox.staleness.append(self.step - ins.step)

    # --- what the coordinator hears ----------------------------------------------------
    def join_request(self, where: dict | None = None) -> JoinRequest:
        live = self.models[~self.failed]
        return JoinRequest(live, self.step, self.reason, where or {})

    def report(self) -> StackReport:
        """Everything since the last report, for the whole stack; empties the outbox."""
        out = self.outbox
        if self.done and not self.final_published:  # the job's last round sees every
            out.published[:] = True  # final state, once
            self.final_published = True
        pub = out.published & ~self.failed
        new = pub & ~self.introduced  # the coordinator lacks their tethers
        self.introduced |= new
        idx = np.flatnonzero(pub)
        sel = torch.as_tensor(idx, device=self.device)
        at = torch.as_tensor(np.flatnonzero(new), device=self.device)
        tethers = {n: t[at].cpu().numpy() for n, t in self.stack.tethers.items()}
        features = weights = outputs = None
        if len(idx) and self.coordinated and self.traits["compat"] and self.cfg.compat.fn == "cka":
            features = self.features(sel)
        if len(idx) and self.coordinated and self.traits["outputs"]:
            with torch.no_grad():
                logits = self.stack.forward(self.probe, shared=True)[sel]  # (n_pub, n, C)
                outputs = torch.softmax(logits.float(), 2).cpu().numpy()
        if len(idx) and self.coordinated and self.traits["weights"]:
            with torch.no_grad():  # the trained weights W (not W * T) and biases
                p = self.stack.params
                weights = {
                    n: (p[f"{n}.weight"][sel].cpu().numpy(), p[f"{n}.bias"][sel].cpu().numpy())
                    for n in self.layers
                }
        finished = self.failed | self.done
        rep = StackReport(
            models=self.models,
            step=self.step,
            epoch=out.epoch,
            losses=self.last[0].copy(),
            grad_norms=self.last[1].copy(),
            published=pub,
            introduced=new,
            tethers=tethers,
            features=features,
            outputs=outputs,
            weights=weights,
            probes=self.probes(),
            events=tuple(out.events),
            rejections=tuple(out.rejections),
            rejoined=tuple(out.rejoined),
            epoch_report=out.epoch_report,
            finished=finished,
            failed=self.failed.copy(),
            final=self.done,
            staleness=tuple(out.staleness),
        )
        self.outbox = Outbox(self.k)
        return rep

    @property
    def skippable(self) -> bool:
        """Whether this boundary's report can wait for the next: no model of the job can
        have published since the last report (the trigger's schedule says so, the same for
        every stack, so no round can be due), and nothing else happened here that the
        coordinator must hear now. What did happen (losses, applied mail's staleness)
        rides the next report."""
        o = self.outbox
        return (
            o.quiet
            and not self.done
            and not (o.events or o.rejections or o.rejoined or o.epoch_report)
            and not o.published.any()
        )

    @property
    def has_news(self) -> bool:
        """Whether something happened since the last report that the coordinator must hear."""
        o = self.outbox
        return bool(
            o.events
            or o.rejections
            or o.rejoined
            or o.epoch_report
            or o.published.any()
            or o.staleness  # the last round's mail, applied: the coordinator counts it
        )

    @torch.no_grad()
    def features(self, sel: torch.Tensor) -> dict[str, np.ndarray]:
        """compat.fn cka: per layer, each selected model's centred Gram of its outputs on
        the probe batch, (n_pub, n, n), from one forward pass of the stack."""
        _, taps = self.stack.forward_taps(self.probe, shared=True)
        out = {}
        for name, h in zip(self.layers, taps, strict=True):
            h = h[sel].flatten(2).float()  # (n_pub, n, H)
            hc = h - h.mean(1, keepdim=True)
            out[name] = (hc @ hc.mT).cpu().numpy()  # (n_pub, n, n)
        return out

    @torch.no_grad()
    def probes(self) -> dict[str, np.ndarray]:
        """For the plots, all k at once: the seed's tracked weights (first entry of the first
        and second tethered weights), the fraction of zero weights, and the entropy."""
        ws = [self.stack.weight(n).detach().flatten(1) for n in self.layers]  # (k, P_l)
        zeros = torch.stack([(w == 0).sum(1) for w in ws]).sum(0).double()  # (k,)
        size = sum(w.shape[1] for w in ws)
        second = ws[1] if len(ws) > 1 else ws[0]
        p1, p2, sp = torch.stack([ws[0][:, 0].double(), second[:, 0].double(), zeros / size])
        return {
            "probe1": p1.cpu().numpy(),
            "probe2": p2.cpu().numpy(),
            "sparsity": sp.cpu().numpy(),
            "entropy": self.entropy.copy(),
        }

    # --- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, probs: bool = False):
        """(k, 2) loss and accuracy (ensemble.outputs.evaluation.score) of every model on the shared
        x (N, ...), y (N,); with probs=True also their class probabilities (k, N, C)."""
        p = torch.softmax(self.stack.forward(x, shared=True), 2).float().cpu().numpy()
        s = score(p, y.cpu().numpy())
        scores = np.stack([s["nll"], s["accuracy"]], 1)
        return (scores, p) if probs else scores

    @torch.no_grad()
    def evaluate_own_val(self) -> np.ndarray:
        """(k, 2) loss and accuracy of each model on its own validation rows (its share of
        the validation split, in its group's view), in one pass of the stack; all of x_val
        when every model validates on all of it."""
        if self.own_val is None:
            return self.evaluate(self.x_val, self.y_val)
        index, mask = self.own_val
        logits = self.stack.forward(self.x_val[index])  # (k, V, C): each model its own rows
        p = torch.softmax(logits, 2).float().cpu().numpy()
        s = score(p, self.y_val[index].cpu().numpy(), mask.cpu().numpy())
        return np.stack([s["nll"], s["accuracy"]], 1)

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(k, N, C): every model's probabilities on the shared x (N, ...)."""
        x = torch.tensor(np.asarray(x), device=self.device)  # a copy: x may be read-only
        logits = self.stack.forward(x, shared=True)
        return torch.softmax(logits, 2).cpu().numpy()

    def results(self, blocked: float, seconds: float) -> list[MemberResult]:
        test = self.predict_proba(self.data.x_test)  # (k, N_test, C)
        return [
            MemberResult(
                m,
                self.step,
                test[i].copy(),
                self.stack.member_state(i),
                blocked,
                seconds,
                bool(self.failed[i]),
            )
            for i, m in enumerate(self.ids)
        ]

    # --- state: checkpoints, snapshots, rollback --------------------------------------
    def state(self, copy: bool = False) -> dict:
        """The stack's training state: parameters, tethers and Adam's moments."""
        c = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())  # noqa: E731
        rows = {key: c(v) for key, v in self.stack.rows(slice(None)).items()}
        moments = {
            name: {key: c(st[key]) for key in ("exp_avg", "exp_avg_sq") if key in st}
            for name, p in self.stack.params.items()
            if (st := self.opt.state.get(p))
        }
        return {"rows": rows, "moments": moments}

    @torch.no_grad()
    def restore_row(self, i: int, state: dict) -> None:
        """Model i's slices of parameters, tethers and Adam moments from `state` (moments
        it lacks were not there yet: Adam had not stepped, so they are zero)."""
        self.stack.set_rows(i, {key: v[i] for key, v in state["rows"].items()})
        for name, p in self.stack.params.items():
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    saved = state["moments"].get(name, {}).get(key)
                    st[key][i] = 0.0 if saved is None else saved[i]

    def save_checkpoint(self) -> None:
        """At an epoch start, once `faults.checkpoint_seconds` have passed since the last."""
        now = time.monotonic()
        if self.ckpt is None or now - self.saved_at < self.cfg.faults.checkpoint_seconds:
            return
        self.saved_at = now
        checkpoint.save(
            self.ckpt,
            {
                "rows": self.state()["rows"],
                "opt": self.opt.state_dict(),
                "step": self.step,
                "epoch": self.epoch,
                "batches": self.batches.state(),
                "triggers": self.triggers.state(),
                "failed": self.failed.tolist(),
                "rollbacks": self.rollbacks.tolist(),
            },
        )

    def load_checkpoint(self) -> bool:
        state = checkpoint.load(self.ckpt)
        if state is None:
            return False
        self.stack.set_rows(slice(None), state["rows"])
        self.opt.load_state_dict(state["opt"])
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


# --- the loop ----------------------------------------------------------------------------
class Pending(Protocol):
    def done(self) -> bool: ...  # non-blocking
    def result(self) -> Reply: ...  # blocking


class Link(Protocol):
    """How a trainer reaches the coordinator; Ray's lives in workers/, in-process below."""

    blocked: float  # seconds spent waiting on the coordinator

    def join(self, request: JoinRequest) -> Reply: ...
    def send(self, report: StackReport) -> Pending: ...


def run_stack(trainer: Trainer, link: Link, sync: bool, where: dict | None = None):
    """Train the stack to the end, exchanging at every boundary; -> one MemberResult a model.

    sync: every boundary sends a report, and the reply to boundary b is applied at boundary
    b + 1, after the next window of training: each round's mail lands at a fixed step (the
    run is a function of its seed), and the round overlaps training instead of stalling it.
    async: keep one exchange in flight and train on; a reply is applied at the first
    boundary after it arrives, and boundaries passed meanwhile gather into the next report.
    """
    t0 = time.perf_counter()
    trainer.receive(link.join(trainer.join_request(where)))
    pending = None
    while not trainer.done or pending is not None or trainer.has_news:
        trainer.train_window()
        if pending is not None and (sync or trainer.done or pending.done()):
            trainer.receive(pending.result())
            pending = None
        if pending is None:
            if sync and trainer.skippable:  # nothing the coordinator needs: one call fewer
                continue
            pending = link.send(trainer.report())
            if trainer.done:  # the last word: take the reply now
                trainer.receive(pending.result())
                pending = None
    return trainer.results(link.blocked, time.perf_counter() - t0)
