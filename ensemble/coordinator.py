"""The coordinator: latest tethers in, merge/drift instructions out, everything recorded.

Plain Python. The driver runs it as a named Ray actor (`ray.remote(Coordinator)`); tests
and benchmarks can drive it in-process. Tethers change only through instructions, so the
coordinator applies each instruction to its own bank when it decides it: the bank always
equals what every worker holds once it has applied its mailbox.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ensemble import align, maths
from ensemble.compat import SAME_TOL, TetherBank
from ensemble.config import Config, dump_config
from ensemble.history import HistoryWriter
from ensemble.metrics import ensemble_probs, scores
from ensemble.policy import ENSEMBLE, Instruction, LayerView, PolicyParams, make_policy
from ensemble.recovery import restore

__all__ = ["ENSEMBLE", "Coordinator", "TetherReport", "apply_instruction"]


@dataclass(frozen=True)
class TetherReport:
    """Worker -> coordinator: one model's tethers and training state at a step."""

    model: int
    step: int
    epoch: int
    loss: float
    grad_norm: float
    tethers: dict[str, np.ndarray]  # layer -> (out, in) float32
    probes: dict[str, float] | None = None  # probe1, probe2, entropy, sparsity (for plots)
    # compat.fn cka: layer -> (n, n) centred Gram of the layer's outputs on the probe batch
    features: dict[str, np.ndarray] | None = None
    # alignment or weight merge: layer -> (W * T, bias), the tethered weights
    weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def policy_params(cfg: Config) -> PolicyParams:
    p = cfg.policy
    return PolicyParams(
        p.merge_above,
        p.drift_below,
        p.alpha,
        p.eta,
        p.max_merges_per_epoch,
        p.max_drifts_per_epoch,
        p.drift,
    )


class Coordinator:
    def __init__(
        self,
        cfg: Config,
        job: str,
        shapes: dict[str, tuple[int, int]],
        run_dir: str,
        peers: dict[str, tuple[str, np.ndarray]] | None = None,
        val_labels: np.ndarray | None = None,
    ):
        """peers: name -> (layer, tether): fixed, non-training tethers that take part in
        compatibility and decisions on their layer but never change (the seed's external
        `tether_other_model.txt`). They get the model ids after the trained models.
        val_labels: the validation split's labels, to score the ensemble every epoch."""
        self.cfg = cfg
        self.job = job
        self.count = cfg.models.count
        peers = peers or {}
        self.bank = TetherBank(self.count + len(peers), shapes)
        self.peer_rows: dict[str, list[int]] = {}
        self.peer_names: dict[int, str] = {}
        for k, (name, (layer, tether)) in enumerate(peers.items()):
            pid = self.count + k
            self.bank.write(pid, {layer: tether})
            self.peer_rows.setdefault(layer, []).append(pid)
            self.peer_names[pid] = name
        self.layers = list(cfg.policy.layers or shapes)
        # Function space: compat from each model's probe-batch Grams, not from its tethers;
        # the bank is made on the first publication that carries them.
        self.features: TetherBank | None = None
        self.has_features = np.zeros(self.count, dtype=bool)
        self.params: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # latest W*T, b
        self.policy = make_policy(cfg.policy.name, policy_params(cfg))
        self.history = HistoryWriter(
            Path(run_dir) / "history.sqlite",
            job,
            dump_config(cfg),
            retention=cfg.history.generations,
        )
        self.generation = [-1] * self.count  # latest tether generation snapshotted
        self.known = np.zeros(self.count, dtype=bool)  # has published at least once
        self.active = np.ones(self.count, dtype=bool)  # still training
        self.quarantined = np.zeros(self.count, dtype=bool)  # non-finite: never a partner
        self.contact = [time.time()] * self.count  # last call from each model
        self.mailbox: dict[int, list[Instruction]] = {m: [] for m in range(self.count)}
        self.step = [0] * self.count
        self.epoch = [0] * self.count
        self.loss = [math.nan] * self.count
        self.val_acc = [math.nan] * self.count
        self.per_epoch: dict[tuple[str, int, int], int] = {}  # (kind, model, epoch) -> count
        self.val_labels = val_labels
        self.failed: set[int] = set()  # stopped for good: not ensemble members
        self.since_round = 0
        self.rounds = self.merges = self.drifts = self.publications = self.rejected = 0
        if self.history.reopened:  # a restart, or a resumed job: the history is the truth
            restore(self)

    # --- worker-facing -------------------------------------------------------------------
    def publish(self, report: TetherReport) -> list[Instruction]:
        """Record a publication, maybe run a round, and return the model's pending mail."""
        m = report.model
        self.contact[m] = time.time()
        self.history.publication(
            m, report.step, report.epoch, report.loss, report.grad_norm, report.probes
        )
        self.publications += 1
        self.step[m], self.epoch[m], self.loss[m] = report.step, report.epoch, report.loss
        bad = poisoned(report)
        if bad:  # never let a non-finite tether into the bank, so no partner ever gets one
            self.quarantine(m, report.step, bad)
            return self.poll(m)
        if not self.mailbox[m]:  # with mail pending, the bank is already ahead of the report
            self.bank.write(m, report.tethers)
        if self.cfg.compat.fn == "cka" and report.features is not None:
            if self.features is None:
                shapes = {k: v.shape for k, v in report.features.items()}
                self.features = TetherBank(self.count, shapes)
            self.features.write(m, report.features)
            self.has_features[m] = True
        if report.weights is not None:
            self.params[m] = report.weights
        if not self.known[m]:  # generation 0: the tethers a model starts with
            self.known[m] = True
            self.snapshot(m, None)
        self.since_round += 1
        if self.policy.coordinates and self.since_round >= self.round_every():
            self.run_round()
        return self.poll(m)

    def poll(self, model: int) -> list[Instruction]:
        self.contact[model] = time.time()
        out, self.mailbox[model] = self.mailbox[model], []
        return out

    def quarantine(self, model: int, step: int, reason: str) -> None:
        """A model with non-finite loss or tethers: never a partner until it rejoins."""
        if not self.quarantined[model]:
            self.quarantined[model] = True
            self.history.event("quarantined", model, step, reason=reason)

    def rejoin(self, model: int, step: int, reason: str) -> list[Instruction]:
        """A worker restarted, resumed or rolled back from a checkpoint: its tethers are older
        than the bank's. Replace its pending mail by one `sync` per layer (the bank's rows,
        which already include every decision made for it) and let it take part again."""
        pending = len(self.mailbox[model])
        self.quarantined[model] = False
        self.active[model] = True
        self.step[model] = step
        self.history.event(
            reason, model, step, pending_instructions=pending, synced=bool(self.known[model])
        )
        self.mailbox[model] = self.sync_mail(model) if self.known[model] else []
        return self.poll(model)

    def sync_mail(self, model: int) -> list[Instruction]:
        return [
            Instruction(
                "sync",
                model,
                model,
                layer,
                1.0,
                math.nan,
                "resync",
                self.bank.row(model, layer).copy(),
            )
            for layer in self.bank.shapes
        ]

    def reject(
        self,
        model: int,
        step: int,
        merges: list[Instruction],
        loss_before: float,
        loss_after: float,
        tethers: dict[str, np.ndarray],
    ) -> None:
        """The merge guard: the model undid `merges` because they raised its validation loss.

        Each is recorded as a `rejected` event; the model's tethers, as the worker holds them
        again, become the bank's row and a new generation."""
        for ins in merges:
            self.history.event(
                "rejected",
                model,
                step,
                partner=ins.partner,
                layer=ins.layer,
                round=ins.round,
                compat=ins.compat,
                val_loss_before=loss_before,
                val_loss_after=loss_after,
            )
        self.rejected += len(merges)
        if not self.mailbox[model]:
            self.bank.write(model, tethers)
            self.snapshot(model, None)

    def record_metrics(self, model: int, epoch: int, split: str, loss: float, acc: float):
        self.contact[model] = time.time()
        self.history.metrics(model, epoch, split, loss, acc)
        if split == "val":
            self.val_acc[model] = acc

    def record_val_probs(self, model: int, epoch: int, probs: np.ndarray) -> None:
        """Keep a member's validation probabilities (in the history, so they survive a
        restart); once every model still in the job has reported an epoch, record the
        ensemble's score under model -1."""
        if self.val_labels is None:
            return
        got = self.history.val_probs(model, epoch, probs)
        members = [m for m in range(self.count) if m not in self.failed]
        if set(members) <= set(got):
            p = ensemble_probs([got[m] for m in members])
            s = scores(p, self.val_labels)
            self.history.metrics(ENSEMBLE, epoch, "val", s["nll"], s["accuracy"])

    def record_event(
        self,
        kind: str,
        model: int | None = None,
        step: int | None = None,
        detail: dict | None = None,
    ):
        self.history.event(kind, model, step, **(detail or {}))

    def finish(self, model: int, step: int, failed: bool = False) -> list[Instruction]:
        """The model stops training: no further decisions involve it; hand over its mail."""
        self.active[model] = False
        self.step[model] = step
        if failed:
            self.failed.add(model)
        self.history.event("failed" if failed else "finished", model, step)
        return self.poll(model)

    # --- decisions -----------------------------------------------------------------------
    def round_every(self) -> int:
        return self.cfg.coordinator.round_every or max(1, int(self.active.sum()))

    def run_round(self) -> list[Instruction]:
        self.since_round = 0
        eligible = self.known & self.active & ~self.quarantined
        if self.cfg.compat.fn == "cka":  # function space: only models whose outputs we know
            eligible &= self.has_features
        models = np.flatnonzero(eligible)
        views = {}
        for layer in self.layers:  # fixed peers join the layer their tether belongs to
            rows = np.concatenate([models, self.peer_rows.get(layer, [])]).astype(np.int64)
            if len(rows) >= 2:
                views[layer] = LayerView(rows, *self.layer_compat(layer, rows))
        if not views:
            return []
        counts = {
            (kind, int(m)): self.per_epoch.get((kind, int(m), self.epoch[m]), 0)
            for m in models
            for kind in ("merge", "drift")
        }
        # Peers are fixed: instructions addressed to them are not given.
        decided = [i for i in self.policy.decide(views, counts) if i.model < self.count]
        # Snapshot pre-round rows of everyone involved, then apply.
        pre = {
            (m, i.layer): self.bank.row(m, i.layer).copy()
            for i in decided
            for m in (i.model, i.partner)
            if m != ENSEMBLE
        }
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        out, records = [], []
        forces: dict[str, dict[int, np.ndarray]] = {}  # layer -> model -> repulsion
        perms: dict[tuple[int, int], list[np.ndarray] | None] = {}
        for ins in decided:
            ins = self.payload(ins, pre, views, forces, perms)
            new = apply_instruction(pre[(ins.model, ins.layer)], ins, lo, hi)
            m, epoch = ins.model, self.epoch[ins.model]
            self.per_epoch[(ins.kind, m, epoch)] = self.per_epoch.get((ins.kind, m, epoch), 0) + 1
            p = self.cfg.policy
            records.append(
                (
                    ins.kind,
                    m,
                    ins.partner,
                    ins.layer,
                    ins.rate,
                    ins.compat,
                    ins.rule,
                    p.merge_above,
                    p.drift_below,
                    self.step[m],
                    epoch,
                    self.per_epoch.get(("merge", m, epoch), 0),
                )
            )
            out.append((ins, new))
        compat = {layer: (v.models.tolist(), v.compat.tolist()) for layer, v in views.items()}
        round_id = self.history.round(models.tolist(), compat, records)
        for ins, new in out:  # recorded first: nothing is sent that the history lacks
            self.bank.write(ins.model, {ins.layer: new})
            self.mailbox[ins.model].append(replace(ins, round=round_id))
        for m in sorted({ins.model for ins in decided}):  # a new generation per changed model
            self.snapshot(m, round_id)
        self.rounds += 1
        once = [i for i in decided if not 0 <= i.partner < self.count or i.model < i.partner]
        self.merges += sum(i.kind == "merge" for i in once)
        self.drifts += sum(i.kind == "drift" for i in once)
        return [ins for ins, _ in out]

    def layer_compat(self, layer: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Compatibility and squared tether distances among `rows`, each (k, k)."""
        cc = self.cfg.compat
        if self.features is None or cc.fn != "cka":
            return self.bank.compat(layer, cc.fn, rows, cc.normalize)
        g = self.bank.gram(layer)[np.ix_(rows, rows)].astype(np.float64)
        sq = maths.sq_dist_from_gram(g)
        c = self.features.compat(layer, "cosine", rows)[0]  # linear CKA
        if cc.normalize == "zscore":
            c = maths.zscore_offdiag(c, same=sq <= SAME_TOL)
        return c, sq

    def payload(self, ins, pre, views, forces, perms) -> Instruction:
        """What the worker needs to carry out `ins`: the partner's tether (aligned, or the
        virtual partner T - r of a repulsive drift) and, for a weight merge, its weights."""
        own = pre[(ins.model, ins.layer)]
        if ins.partner == ENSEMBLE:
            if ins.layer not in forces:
                v = views[ins.layer]
                r, _ = maths.rbf_repulsion(self.bank.buffers[ins.layer][v.models], v.sq_dist)
                forces[ins.layer] = dict(zip(v.models.tolist(), r, strict=True))
            force = forces[ins.layer][ins.model].reshape(own.shape)
            return replace(ins, partner_tether=own - force)
        partner = pre[(ins.partner, ins.layer)]
        p = self.cfg.policy
        if ins.kind != "merge" or not (p.align or p.merge == "weights"):
            return replace(ins, partner_tether=partner)
        mine, theirs = self.params.get(ins.model), self.params.get(ins.partner)
        if mine is None or theirs is None or ins.partner >= self.count:
            return replace(ins, partner_tether=partner)  # nothing published to align by
        key = (min(ins.model, ins.partner), max(ins.model, ins.partner))
        if p.align and key not in perms:  # units of the larger id in the smaller id's order
            perms[key] = align.weight_matching(self.params[key[0]], self.params[key[1]])
        pm = perms.get(key)
        if pm is not None and ins.model == key[1]:
            pm = align.inverse(pm)
        li = list(self.bank.shapes).index(ins.layer)  # forward order: neighbours permute too
        w, b = theirs[ins.layer]
        if pm is not None:
            partner, w, b = (align.permute(x, li, pm) for x in (partner, w, b))
        weights = (w, b) if p.merge == "weights" else None
        return replace(ins, partner_tether=partner, partner_weights=weights)

    def snapshot(self, model: int, round_id: int | None) -> None:
        self.generation[model] += 1
        self.history.generation(
            model, self.generation[model], round_id, self.step[model], self.bank.tethers(model)
        )

    # --- observers -----------------------------------------------------------------------
    def progress(self) -> dict:
        return {
            "rounds": self.rounds,
            "merges": self.merges,
            "drifts": self.drifts,
            "rejected": self.rejected,
            "publications": self.publications,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "models": [
                {
                    "model": m,
                    "step": self.step[m],
                    "epoch": self.epoch[m],
                    "loss": self.loss[m],
                    "val_acc": self.val_acc[m],
                    "active": bool(self.active[m]),
                    "quarantined": bool(self.quarantined[m]),
                    "idle_seconds": time.time() - self.contact[m],
                }
                for m in range(self.count)
            ],
        }

    def tethers(self, model: int) -> dict[str, np.ndarray]:
        return self.bank.tethers(model)

    def close(self) -> None:
        self.history.close()


def poisoned(report: TetherReport) -> str | None:
    """Why a report must not be trusted, or None."""
    if not math.isfinite(report.loss):
        return f"loss is {report.loss}"
    for layer, t in report.tethers.items():
        if not np.isfinite(t).all():
            return f"tether {layer} has non-finite values"
    return None


def apply_instruction(tether: np.ndarray, ins: Instruction, lo: float, hi: float) -> np.ndarray:
    """The one place merge/drift maths meets an instruction; workers call it too."""
    assert ins.partner_tether is not None and ins.partner_tether.shape == tether.shape
    if ins.kind == "merge":
        return maths.merge(tether, ins.partner_tether, ins.rate)
    if ins.kind == "sync":
        return ins.partner_tether.astype(tether.dtype, copy=True)
    return maths.drift(tether, ins.partner_tether, ins.rate, lo, hi)
