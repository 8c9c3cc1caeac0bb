"""k tethered MLPs trained as one stacked computation, so one actor can hold k models.

Each layer holds W (k, out, in), b (k, out) and the tether buffer T (k, out, in) and computes
every model's own batch at once: relu(baddbmm(b, x, (W * T)ᵀ)). Model i starts bit-identical
to TetheredMLP(..., seed=seeds[i]) and trains as it would alone: the loss is the sum of each
model's mean loss, so each model's gradient is its own, and Adam is elementwise, so its
state stays per model in effect. Shuffles, triggers, surge-collapse, publications and
instructions stay per model; only the arithmetic is stacked.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ensemble import checkpoint, maths
from ensemble.config import Config
from ensemble.coordinator import TetherReport, apply_instruction
from ensemble.data import Dataset
from ensemble.dynamics import Action, SurgeCollapse, activation_entropy
from ensemble.model import TetheredLinear, TetheredMLP
from ensemble.policy import Instruction
from ensemble.training import (
    Link,
    MemberResult,
    init_seeds,
    member_seed,
    model_sizes,
    needs_weights,
    output_grams,
    probe_batch,
)
from ensemble.triggers import make_trigger


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def stack_file(ids: list[int]) -> str:
    """The checkpoint file of the stack of models `ids`."""
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:10]
    return f"stack_{ids[0]}x{len(ids)}_{digest}.pt"


def settle(link: Link, calls: list[tuple]) -> None:
    """Send every (method, *args) at once, then wait for all: one overlap, not k round trips."""
    for handle in [link.call(*c) for c in calls]:
        link.get(handle)


class StackedLinear(nn.Module):
    """k TetheredLinears: weight (k, out, in), bias (k, out), tether buffer (k, out, in)."""

    def __init__(self, layers: list[TetheredLinear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.linear.weight.detach() for m in layers]))
        self.bias = nn.Parameter(torch.stack([m.linear.bias.detach() for m in layers]))
        self.register_buffer("tether", torch.stack([m.tether for m in layers]))

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        """xt: (k, in, B), batch last -> (k, out, B). Batch-last keeps W's gradient in W's
        own (k, out, in) layout: no strided multiply or copy in backward (~30% faster)."""
        return torch.baddbmm(self.bias.unsqueeze(2), self.weight * self.tether, xt)


class StackedMLP(nn.Module):
    def __init__(
        self, sizes: list[int], tether_init: str = "normal", tether_std: float = 0.1, seeds=(0,)
    ):
        """sizes: [in, hidden..., out]; model i is TetheredMLP(sizes, ..., *seeds[i]): seeds
        are weight seeds, or (weight seed, tether seed) pairs."""
        super().__init__()
        pairs = [s if isinstance(s, tuple) else (s, None) for s in seeds]
        members = [TetheredMLP(sizes, tether_init, tether_std, *s) for s in pairs]
        self.k, self.sizes, self.names = len(members), list(sizes), members[0].names
        self.layers = nn.ModuleDict(
            {n: StackedLinear([m.layers[n] for m in members]) for n in self.names}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_hidden(x)[0]

    def forward_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (k, B, in), each model its own batch, or (B, in) shared by all. Returns logits
        (k, B, C) and every hidden layer's post-ReLU activations (k, B, H_l), as views of
        batch-last tensors: logits.mT is (k, C, B), the layout cross_entropy takes."""
        xt = x.mT if x.dim() == 3 else x.T.expand(self.k, *x.T.shape)  # (k, in, B), no copy
        hidden = []
        for name in self.names[:-1]:
            xt = torch.relu(self.layers[name](xt))  # (k, H_l, B)
            hidden.append(xt.mT)
        return self.layers[self.names[-1]](xt).mT, hidden

    def member_state(self, i: int) -> dict[str, np.ndarray]:
        """Model i as TetheredMLP.state_dict() would give it, numpy copies (safetensors)."""
        out = {}
        for n in self.names:
            layer = self.layers[n]
            for key, t in (("tether", layer.tether), ("linear.weight", layer.weight)):
                out[f"layers.{n}.{key}"] = t[i].detach().cpu().numpy().copy()
            out[f"layers.{n}.linear.bias"] = layer.bias[i].detach().cpu().numpy().copy()
        return out

    def export_tethers(self, i: int) -> dict[str, np.ndarray]:
        """layer -> model i's float32 tether (out, in), a copy."""
        return {n: self.layers[n].tether.detach()[i].cpu().numpy().copy() for n in self.names}

    @torch.no_grad()
    def import_tethers(self, i: int, tethers: dict[str, np.ndarray]) -> None:
        for name, arr in tethers.items():
            if name not in self.layers:
                raise ValueError(f"tether for unknown layer {name!r}; layers are {self.names}")
            buf = self.layers[name].tether[i]  # (out, in), a view
            if tuple(arr.shape) != tuple(buf.shape):
                raise ValueError(
                    f"tether {name!r} has shape {tuple(arr.shape)}, expected {tuple(buf.shape)}"
                )
            buf.copy_(torch.as_tensor(np.asarray(arr, dtype=np.float32)))

    def weight_matrices(self, i: int) -> dict[str, torch.Tensor]:
        """layer -> model i's W (out, in), a view of the stacked data (surge-collapse)."""
        return {n: self.layers[n].weight.data[i] for n in self.names}


class StackedTrainer:
    """Trainer for the models `ids` at once: same loop, same calls, one stacked step."""

    def __init__(
        self,
        ids: list[int],
        cfg: Config,
        data: Dataset,
        device: str = "auto",
        checkpoint_dir: Path | None = None,
        resumed: bool = False,
    ):
        """device: cpu, cuda or auto. checkpoint_dir: as Trainer's: the whole stack is
        checkpointed at each epoch start; an existing checkpoint is loaded and every model
        rejoins the coordinator ('resumed' or 'restarted')."""
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"ids must be distinct model ids, got {ids}")
        self.ids, self.k, self.cfg, self.data = list(ids), len(ids), cfg, data
        self.row = {m: i for i, m in enumerate(self.ids)}
        self.device = dev = resolve_device(device)
        seeds = [member_seed(cfg, m) for m in self.ids]
        sizes = model_sizes(cfg, data)
        inits = [init_seeds(cfg, m) for m in self.ids]
        self.model = StackedMLP(sizes, cfg.tether.init, cfg.tether.std, inits).to(dev)
        # Adam is elementwise: per-model state in effect. fused: a few kernels, not ~60 ops.
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr, fused=True)
        self.triggers = [make_trigger(cfg.trigger) for _ in ids]
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        # One flat copy of the training data; model i draws from [offset[i], offset[i] + n[i]).
        x, y = data.x_train, data.y_train
        if cfg.data.shard:  # a disjoint slice per model, as Trainer
            c = cfg.models.count
            xs, ys = [x[m::c] for m in self.ids], [y[m::c] for m in self.ids]
            x, y = np.concatenate(xs), np.concatenate(ys)
            self.n = [len(v) for v in ys]
            self.offset = np.cumsum([0, *self.n[:-1]]).tolist()
        else:
            self.n, self.offset = [len(y)] * self.k, [0] * self.k
        self.x, self.y = torch.tensor(x).to(dev), torch.tensor(y).to(dev)
        self.probe = torch.tensor(probe_batch(cfg, data)).to(dev)
        self.rejected = [0] * self.k  # merges undone by the merge guard, per model
        bs = cfg.train.batch_size
        if len({math.ceil(n / bs) for n in self.n}) > 1:
            raise ValueError(
                f"models {self.ids} have shards of {self.n} samples, so different numbers of "
                f"steps per epoch at batch_size={bs}; stack models with equal step counts"
            )
        self.step = 0
        self._probes: tuple[int, list] = (-1, [])  # (step, [probe1s, probe2s, sparsities])
        self._outputs: tuple[int, list] = (-1, [])  # (step, per layer (k, n, H) on the probe)
        self.applied = [0] * self.k
        on = cfg.dynamics.mode != "off"
        self.dynamics = [SurgeCollapse(cfg.dynamics, s) for s in seeds] if on else None
        self.entropy: list[float | None] = [None] * self.k
        self.actions: list[list[Action]] = [[] for _ in ids]  # per model, not yet reported
        self.epoch = 0  # the epoch to train next
        self.failed = [False] * self.k  # stopped after a non-finite loss or gradient
        self.ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / stack_file(ids)
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
            gens=[g.get_state() for g in self.gens],
            triggers=[[t.prev_loss, t.last_fired] for t in self.triggers],
            failed=self.failed,
        )

    def load_checkpoint(self) -> bool:
        state = checkpoint.restore_training(self.ckpt, self.model, self.opt)
        if state is None:
            return False
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.failed = list(state["failed"])
        for g, gs in zip(self.gens, state["gens"], strict=True):
            g.set_state(gs)
        for t, (prev, last) in zip(self.triggers, state["triggers"], strict=True):
            t.prev_loss, t.last_fired = prev, last
        return True

    def batches(self) -> Generator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """One epoch: (x (k, B, F), y (k, B), mask (k, B) or None when all rows are real).
        Model i's rows follow its own permutation, exactly as Trainer.batches draws them."""
        bs, dev = self.cfg.train.batch_size, self.device
        own = zip(self.n, self.gens, self.offset, strict=True)
        perms = [torch.randperm(n, generator=g) + o for n, g, o in own]  # k of (n_i,)
        longest = max(self.n)
        if min(self.n) == longest:
            idx_all = torch.stack(perms).to(dev)  # (k, N)
        else:  # unequal shards: pad with -1, masked out of the loss
            idx_all = torch.stack([F.pad(p, (0, longest - len(p)), value=-1) for p in perms])
            idx_all = idx_all.to(dev)
        for s in range(0, longest, bs):
            idx = idx_all[:, s : s + bs]  # (k, B)
            mask = None
            if min(self.n) != longest:
                mask, idx = idx >= 0, idx.clamp(min=0)
            yield self.x[idx], self.y[idx], mask

    def train_step(self, xb, yb, mask=None) -> tuple[list[float], list[float]]:
        """One step of every model: xb (k, B, F), yb (k, B). Returns per-model losses and
        gradient norms (each the norm over that model's slices of every parameter)."""
        self.model.train()
        k, b = yb.shape
        rows = [b] * k if mask is None else mask.sum(1).tolist()  # real rows per model
        dyn = self.dynamics
        if dyn is not None:  # per model, its own noise stream on its own real rows
            xb = xb.clone()  # (k, B, F), the caller's batch stays as it was
            for i, d in enumerate(dyn):
                xi = xb[i, : rows[i]]
                xb[i, : rows[i]] = d.input_noise(self.step + 1, xi.cpu()).to(xb.device)
        logits, hidden = self.model.forward_hidden(xb)  # (k, B, C), [(k, B, H_l)]
        ce = F.cross_entropy(logits.mT, yb, reduction="none")  # (k, C, B) -> (k, B)
        losses = ce.mean(1) if mask is None else (ce * mask).sum(1) / mask.sum(1)  # (k,)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # d(sum)/dW_i = d(loss_i)/dW_i
        with torch.no_grad():
            grads = [p.grad.reshape(k, -1) for p in self.model.parameters()]
            per = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads], 1)  # (k, P)
            loss_list, norm_list = torch.stack([losses, per.norm(dim=1)]).tolist()  # (2, k)
        self.opt.step()
        self.step += 1
        if dyn is not None:
            bins, cpu = self.cfg.dynamics.bins, self.device.type == "cpu"
            for i, d in enumerate(dyn):
                if self.failed[i] or not math.isfinite(loss_list[i] + norm_list[i]):
                    continue  # histc cannot bin NaN; the model is about to stop
                ents = [activation_entropy(h[i, : rows[i]], bins) for h in hidden]
                self.entropy[i] = sum(ents) / len(ents) if ents else None
                ws = {n: w.cpu() for n, w in self.model.weight_matrices(i).items()}  # views on cpu
                self.actions[i] += d.act(self.step, ws, ents)
                if not cpu:
                    for n, w in self.model.weight_matrices(i).items():
                        w.copy_(ws[n])
        return loss_list, norm_list

    @torch.no_grad()
    def apply(self, instructions: list[Instruction]) -> None:
        """Apply instructions in the order decided, each to its model's slice."""
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        if instructions:  # the models change: outputs cached this step are stale
            self._outputs = (-1, [])
        for ins in instructions:
            i = self.row[ins.model]
            layer = self.model.layers[ins.layer]
            buf = layer.tether[i]  # (out, in), a view
            old = buf.cpu().numpy()
            new = apply_instruction(old, ins, lo, hi)
            if ins.kind == "merge" and ins.partner_weights is not None:
                w, b = layer.weight.data[i], layer.bias.data[i]
                pw, pb = ins.partner_weights
                merged = maths.merge_weights(w.cpu().numpy(), old, new, pw, ins.rate)
                w.copy_(torch.from_numpy(merged))
                b.copy_(torch.from_numpy(maths.merge(b.cpu().numpy(), pb, ins.rate)))
            buf.copy_(torch.from_numpy(new))
            self.applied[i] += 1

    def receive(self, link: Link, mail: list[Instruction]) -> None:
        """Trainer.receive for the stack: the guard judges each model on its own val loss."""
        merges = [ins for ins in mail if ins.kind == "merge"]
        if not (self.cfg.policy.guard and merges):
            self.apply(mail)
            return
        rows = sorted({self.row[ins.model] for ins in merges})
        d = self.data
        before = self.evaluate(d.x_val, d.y_val)
        saved = {
            (n, key, i): getattr(layer, key).data[i].clone()
            for n, layer in self.model.layers.items()
            for key in ("weight", "bias", "tether")
            for i in rows
        }
        self.apply(mail)
        after = self.evaluate(d.x_val, d.y_val)
        for i in rows:
            if after[i][0] <= before[i][0]:
                continue
            for (n, key, r), v in saved.items():
                if r == i:
                    getattr(self.model.layers[n], key).data[i].copy_(v)
            m = self.ids[i]
            mine = [ins for ins in merges if ins.model == m]
            self.apply([ins for ins in mail if ins.model == m and ins.kind != "merge"])
            self.rejected[i] += len(mine)
            tethers = self.model.export_tethers(i)
            link.get(link.call("reject", m, self.step, mine, before[i][0], after[i][0], tethers))

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(k, N, C): every model's probabilities on the shared x (N, F)."""
        self.model.eval()
        logits = self.model(torch.as_tensor(np.array(x)).to(self.device))
        return torch.softmax(logits, dim=2).cpu().numpy()

    @torch.no_grad()
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        """Per model (loss, accuracy) on the shared x (N, F), y (N,)."""
        self.model.eval()
        logits = self.model(torch.as_tensor(np.array(x)).to(self.device))  # (k, N, C)
        yt = torch.as_tensor(np.array(y)).to(self.device)
        k, n, _ = logits.shape
        loss = F.cross_entropy(logits.mT, yt.expand(k, n), reduction="none")  # (k, N)
        acc = (logits.argmax(2) == yt).float().mean(1)
        return list(zip(loss.mean(1).tolist(), acc.tolist(), strict=True))

    def report(self, i: int, epoch: int, loss: float, grad_norm: float) -> TetherReport:
        tethers = self.model.export_tethers(i)
        return TetherReport(
            self.ids[i],
            self.step,
            epoch,
            loss,
            grad_norm,
            tethers,
            self.probes(i),
            self.features(i),
            self.tethered_weights(i),
        )

    @torch.no_grad()
    def features(self, i: int) -> dict[str, np.ndarray] | None:
        """Trainer.features for model i; one forward of the stack per step serves all k."""
        if self.cfg.compat.fn != "cka":
            return None
        if self._outputs[0] != self.step:
            self.model.eval()
            logits, hidden = self.model.forward_hidden(self.probe)  # shared probe: (k, n, H)
            self._outputs = (self.step, [h.cpu().numpy() for h in (*hidden, logits)])
        return output_grams(self.model.names, [h[i] for h in self._outputs[1]])

    @torch.no_grad()
    def tethered_weights(self, i: int) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        if not needs_weights(self.cfg):
            return None
        return {
            n: ((layer.weight[i] * layer.tether[i]).cpu().numpy(), layer.bias[i].cpu().numpy())
            for n, layer in self.model.layers.items()
        }

    def probes(self, i: int) -> dict[str, float | None]:
        """Trainer.probes for model i; computed for all k at once, once per step."""
        if self._probes[0] != self.step:
            ws = [layer.weight.detach() for layer in self.model.layers.values()]  # (k, o, i)
            zeros = torch.stack([(w == 0).flatten(1).sum(1) for w in ws]).sum(0).tolist()  # (k,)
            size = sum(w[0].numel() for w in ws)
            p1, p2 = torch.stack([ws[0][:, 0, 0], ws[1][:, 0, 0]]).tolist()  # (2, k)
            self._probes = (self.step, [p1, p2, [z / size for z in zeros]])
        p1, p2, sparsity = (v[i] for v in self._probes[1])
        return {"probe1": p1, "probe2": p2, "entropy": self.entropy[i], "sparsity": sparsity}

    def run(self, link: Link) -> list[MemberResult]:
        """Train every epoch; one MemberResult per model, in `ids` order."""
        gen = self.steps(link)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value

    def steps(self, link: Link) -> Generator[int, None, list[MemberResult]]:
        """Trainer.steps for k models: per model at most one call in flight, checked without
        blocking after every stacked step; one `next()` per stacked step."""
        t0 = time.perf_counter()
        inflight: list = [None] * self.k
        last_call = [self.step] * self.k
        poll_steps, d = self.cfg.trigger.poll_steps, self.data
        if self.rejoin:  # older tethers than the coordinator's: take its record
            live = [m for i, m in enumerate(self.ids) if not self.failed[i]]
            for h in [link.call("rejoin", m, self.step, self.rejoin) for m in live]:
                self.apply(link.get(h))
        while self.epoch < self.cfg.train.epochs and not all(self.failed):
            epoch = self.epoch
            self.save_checkpoint()
            for xb, yb, mask in self.batches():
                losses, norms = self.train_step(xb, yb, mask)
                events = [
                    ("record_event", a.kind, m, a.step, a.detail)
                    for i, m in enumerate(self.ids)
                    for a in self.actions[i]
                ]
                self.actions = [[] for _ in self.ids]
                settle(link, events)  # failures and dynamics are data: record them
                for i, m in enumerate(self.ids):  # bookkeeping only, per model
                    if self.failed[i]:
                        continue
                    if inflight[i] is not None and link.ready(inflight[i]):
                        self.receive(link, link.get(inflight[i]))
                        inflight[i] = None
                    if not (math.isfinite(losses[i]) and math.isfinite(norms[i])):
                        self.poison(link, i, losses[i], inflight[i])
                        inflight[i] = None
                        continue
                    fired = self.triggers[i].check(self.step, losses[i], norms[i])
                    if inflight[i] is None:
                        if fired:
                            report = self.report(i, epoch, losses[i], norms[i])
                            inflight[i] = link.call("publish", report)
                            last_call[i] = self.step
                        elif self.step - last_call[i] >= poll_steps:
                            inflight[i] = link.call("poll", m)
                            last_call[i] = self.step
                yield self.step
            train, val = self.evaluate(d.x_train, d.y_train), self.evaluate(d.x_val, d.y_val)
            probs = self.predict_proba(d.x_val)  # (k, N_val, C)
            calls = [
                c
                for i, m in enumerate(self.ids)
                if not self.failed[i]
                for c in (
                    ("record_metrics", m, epoch, "train", *train[i]),
                    ("record_metrics", m, epoch, "val", *val[i]),
                    ("record_val_probs", m, epoch, probs[i].copy()),
                )
            ]
            settle(link, calls)
            self.epoch = epoch + 1
        for h in inflight:
            if h is not None:
                self.receive(link, link.get(h))
        finals = [link.call("finish", m, self.step, self.failed[i]) for i, m in enumerate(self.ids)]
        for h in finals:  # all in flight at once
            self.receive(link, link.get(h))
        if self.epoch >= self.cfg.train.epochs:
            self.save_checkpoint()  # a resumed, finished job restarts nothing
        test = self.predict_proba(d.x_test)  # (k, N_test, C)
        blocked, secs = getattr(link, "blocked", 0.0), time.perf_counter() - t0
        return [
            MemberResult(
                m, self.step, test[i].copy(), self.model.member_state(i), blocked, secs, failed
            )
            for i, (m, failed) in enumerate(zip(self.ids, self.failed, strict=True))
        ]

    def poison(self, link: Link, i: int, loss: float, handle) -> None:
        """Model i's loss or gradient is not finite: quarantine it and stop it. A stack has
        no per-model rollback (its models step in lockstep); the others train on unharmed."""
        if handle is not None:
            self.apply(link.get(handle))
        why = f"loss is {loss}" if not math.isfinite(loss) else "gradient is not finite"
        link.get(link.call("quarantine", self.ids[i], self.step, why))
        self.failed[i] = True
