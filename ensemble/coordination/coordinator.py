"""The coordinator: stack reports in, merge/drift instructions out, everything recorded.

Plain Python: the Ray actor (ensemble.runtime.service) and the in-process job (ensemble.runtime.job) both
wrap it. It is built from a `CoordinatorState` (fresh, or what a history holds) and the
`HistoryWriter` it records into; its constructor does no I/O.

Tethers change only through instructions, so the coordinator applies each instruction to
its bank when it decides it. A model's bank row is therefore what its worker last reported
with the mail it has not received yet applied on top: the bank equals what every worker
holds once it has applied its mail.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ensemble.config import Config
from ensemble.coordination import maths
from ensemble.coordination.compat import SAME_TOL, TetherBank
from ensemble.coordination.policies import LayerView, Population, Round, make_policy, settings_of
from ensemble.coordination.targets import Pool
from ensemble.data.groups import true_groups
from ensemble.history import HistoryWriter
from ensemble.history.records import CoordinatorState
from ensemble.outputs.evaluation import ensemble_probs, score
from ensemble.protocol import (
    ENSEMBLE,
    EpochReport,
    Instruction,
    JoinRequest,
    Rejection,
    Reply,
    StackReport,
    apply_instruction,
)


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM), in MB. Not ru_maxrss:
    Linux carries that across fork and exec, so a spawned process reports its parent's
    peak when that was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Coordinator:
    def __init__(
        self,
        cfg: Config,
        shapes: dict[str, tuple[int, ...]],
        history: HistoryWriter,
        state: CoordinatorState | None = None,
        peers: dict[str, tuple[str, np.ndarray]] | None = None,
        val_labels: np.ndarray | None = None,
    ):
        """shapes: tethered layer -> its tether shape. peers: name -> (layer, tether): fixed,
        non-training tethers that take part in compatibility and decisions on their layer but
        never change (the seed's external `tether_other_model.txt`); they get the model ids
        after the trained models. val_labels: the validation labels, to score the ensemble
        every epoch."""
        state = state or CoordinatorState()
        self.cfg = cfg
        self.job = cfg.job
        self.count = m = cfg.models.count
        peers = peers or {}
        self.bank = TetherBank(m + len(peers), shapes)
        self.peer_rows: dict[str, list[int]] = {}
        for k, (layer, tether) in enumerate(peers.values()):
            self.bank.write(m + k, {layer: tether})
            self.peer_rows.setdefault(layer, []).append(m + k)
        settings = settings_of(cfg.policy)
        self.layers = list(getattr(settings, "layers", None) or shapes)
        # Function space: compat from each model's probe-batch Grams, not from its tethers;
        # the bank is made on the first publication that carries them.
        self.features: TetherBank | None = None
        self.has_features = np.zeros(m, dtype=bool)
        self.params: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # latest W, b
        self.pool = Pool(self.bank, self.params, m, list(shapes))
        population = Population(
            m,
            list(shapes),
            true_groups(m, cfg.data.groups),
            (cfg.tether.min, cfg.tether.max),
        )
        self.policy = make_policy(cfg, population)
        if state.policy:  # what the policy kept, as the history last saved it
            self.policy.restore(state.policy)
        self.history = history
        self.val_labels = val_labels
        self.tracker = None  # TensorBoard scalars (tracking.tensorboard), beside the history
        if cfg.tracking.tensorboard:
            from ensemble.outputs.tracking import TensorBoard

            self.tracker = TensorBoard(history.run_dir)
        # per model
        self.generation = np.array([state.generation.get(i, -1) for i in range(m)])
        self.known = self.generation >= 0  # has published at least once
        self.active = np.array([i not in state.finished for i in range(m)])  # still training
        self.quarantined = np.zeros(m, dtype=bool)  # non-finite: never a partner
        self.contact = np.full(m, time.time())  # last call from each model
        self.step = np.array([state.step.get(i, 0) for i in range(m)])
        self.epoch = np.array([state.epoch.get(i, 0) for i in range(m)])
        self.loss = np.array([state.loss.get(i, math.nan) for i in range(m)])
        self.val_acc = np.full(m, math.nan)
        self.reported = np.full(m, -1)  # latest step each model reported (the sync barrier)
        self.failed = set(state.failed)
        self.ended = set(state.finished)  # models whose finished/failed event is recorded
        self.failed_recorded = set(state.failed)
        self.mailbox: dict[int, list[Instruction]] = {i: [] for i in range(m)}
        for i, tethers in state.tethers.items():  # the history's record is the truth
            self.bank.write(i, tethers)
            self.mailbox[i] = self.sync_mail(i)  # which mail arrived is unknown: resync
        self.per_epoch = dict(state.per_epoch)  # (kind, model, epoch) -> decisions
        self.since_round = 0
        self.rounds, self.merges, self.drifts = state.rounds, state.merges, state.drifts
        self.publications, self.rejected = state.publications, state.rejected
        self.staleness: list[int] = []
        self.finishing: dict[int, int] = {}  # model -> step: finished at this boundary
        self.groups: list[list[int]] | None = state.groups  # what the last round saw

    # --- worker-facing -------------------------------------------------------------------
    def join(self, req: JoinRequest) -> Reply:
        """A stack starts, or rejoins after a restart or a resume: its tethers may be older
        than the bank's, so each known model's pending mail becomes one `sync` per layer."""
        with self.history.tx():
            for m in req.models.tolist():
                self.active[m] = True
                self.contact[m] = time.time()
                if req.reason == "started" and not self.known[m]:
                    self.history.event("started", m, req.step, **req.where)
                else:
                    self.rejoin(m, req.step, req.reason, req.where)
        return self.take_mail(req.models)

    def exchange(self, report: StackReport) -> Reply:
        """Asynchronous mode: take in a report, run a round when one is due, hand back mail."""
        self.receive(report)
        self.close_boundary()
        return self.take_mail(report.models)

    def close_boundary(self) -> None:
        """At an exchange boundary: the round due there, if any, then `settle`."""
        if self.round_due():
            self.run_round()
        self.settle()

    def receive(self, r: StackReport) -> None:
        """Record a stack's report, in one transaction, and bring the bank up to date."""
        now = time.time()
        live = r.models[~(r.failed if r.failed is not None else np.zeros(len(r.models), bool))]
        self.contact[r.models] = now
        self.reported[r.models] = np.maximum(self.reported[r.models], r.step)
        with self.history.tx():
            for ev in r.events:  # quarantine first: a poisoned model is never banked
                self.history.event(ev.kind, ev.model, ev.step, **ev.detail)
                if ev.kind == "quarantined":
                    self.quarantined[ev.model] = True
            for m, why in r.rejoined:
                self.rejoin(m, r.step, why)
            for rej in r.rejections:
                self.reject(rej)
            self.record_publications(r)
            self.step[live], self.epoch[live] = r.step, r.epoch
            self.loss[r.models] = r.losses
            if r.epoch_report is not None:
                self.record_epoch(r.epoch_report)
            self.staleness += list(r.staleness)
            if r.finished is not None:  # the job's last round still includes them
                for i in np.flatnonzero(r.finished):
                    m = int(r.models[i])
                    if r.failed[i] or not self.active[m]:
                        self.finish(m, r.step, bool(r.failed[i]))
                    else:
                        self.finishing[m] = r.step

    def settle(self) -> None:
        """After the boundary's round: the models that finished there stop taking part."""
        if not self.finishing:
            return
        with self.history.tx():
            for m, step in sorted(self.finishing.items()):
                self.finish(m, step)
        self.finishing = {}

    def record_publications(self, r: StackReport) -> None:
        row = {m: i for i, m in enumerate(r.models.tolist())}
        first = []  # generation 0: the tethers a model starts with
        for j, m in enumerate(r.introduced_ids().tolist()):  # tethers the bank lacked
            tethers = {n: t[j] for n, t in r.tethers.items()}
            bad = next((n for n, t in tethers.items() if not np.isfinite(t).all()), None)
            if bad is not None:  # never in the bank: no partner ever gets it
                self.quarantine(m, r.step, f"tether {bad} has non-finite values")
                continue
            self.bank.write(m, self.pending_applied(m, tethers))
            if not self.known[m]:
                self.known[m] = True
                first.append(m)
        self.snapshot(first, None)
        ids = r.published_ids()
        if not len(ids):
            return
        p = r.probes or {}
        cols = [p.get(k) for k in ("probe1", "probe2", "entropy", "sparsity")]
        rows = []
        for m in ids.tolist():
            i = row[m]
            extra = [None if c is None or not math.isfinite(c[i]) else float(c[i]) for c in cols]
            rows.append((m, r.step, r.epoch, float(r.losses[i]), float(r.grad_norms[i]), *extra))
        self.publications += self.history.publications(rows)  # new rows, not replays
        for j, m in enumerate(ids.tolist()):
            if r.features is not None:
                if self.features is None:
                    shapes = {n: f.shape[1:] for n, f in r.features.items()}
                    self.features = TetherBank(self.count, shapes)
                self.features.write(m, {n: f[j] for n, f in r.features.items()})
                self.has_features[m] = True
            if r.weights is not None:
                self.params[m] = {n: (w[j], b[j]) for n, (w, b) in r.weights.items()}
            if r.outputs is not None:
                self.pool.outputs[m] = r.outputs[j]
        self.since_round += len(ids)

    def pending_applied(self, model: int, tethers: dict[str, np.ndarray]) -> dict:
        """A model's reported tethers with its undelivered mail applied: what it will hold."""
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        out = {n: np.array(t, dtype=np.float32) for n, t in tethers.items()}
        for ins in self.mailbox[model]:
            out[ins.layer] = apply_instruction(out[ins.layer], ins, lo, hi)
        return out

    def take_mail(self, models) -> Reply:
        out, unknown = [], []
        for m in np.asarray(models).tolist():
            out += self.mailbox[m]
            self.mailbox[m] = []
            if not self.known[m] and self.active[m]:
                unknown.append(m)
        return Reply(tuple(out), tuple(unknown))

    def quarantine(self, model: int, step: int, reason: str) -> None:
        """A model with non-finite loss or tethers: never a partner until it rejoins."""
        if not self.quarantined[model]:
            self.quarantined[model] = True
            self.history.event("quarantined", model, step, reason=reason)

    def rejoin(self, model: int, step: int, reason: str, where: dict | None = None) -> None:
        """A model restarted, resumed or rolled back: its tethers are older than the bank's.
        Replace its pending mail by one `sync` per layer (the bank's rows, which already
        include every decision made for it), and let it take part again."""
        pending = len(self.mailbox[model])
        self.quarantined[model] = False
        self.active[model] = True
        self.step[model] = step
        self.history.event(
            reason,
            model,
            step,
            pending_instructions=pending,
            synced=bool(self.known[model]),
            **(where or {}),
        )
        self.mailbox[model] = self.sync_mail(model) if self.known[model] else []

    def sync_mail(self, model: int) -> list[Instruction]:
        return [
            Instruction(
                "sync",
                model,
                (model,),
                layer,
                1.0,
                math.nan,
                "resync",
                partner_tether=self.bank.row(model, layer),
            )
            for layer in self.bank.shapes
        ]

    def reject(self, rej: Rejection) -> None:
        """The merge guard undid `rej.merges`: each becomes a `rejected` event, and the
        model's tethers as its worker holds them again (with its newer mail on top) become
        the bank's row at once, and a new generation."""
        for ins in rej.merges:
            self.history.event(
                "rejected",
                rej.model,
                rej.step,
                partner=ins.partner,
                group=list(ins.group),
                layer=ins.layer,
                round=ins.round,
                compat=ins.compat,
                val_loss_before=rej.loss_before,
                val_loss_after=rej.loss_after,
            )
        self.rejected += len(rej.merges)
        self.track()
        self.bank.write(rej.model, self.pending_applied(rej.model, rej.tethers))
        self.snapshot([rej.model], None)

    def record_epoch(self, er: EpochReport) -> None:
        """Members' epoch scores; once every model still in the job has reported an epoch,
        the ensemble's validation score under model -1 (the probabilities are kept in the
        history, so this survives a restart)."""
        models = er.models.tolist()
        for j, m in enumerate(models):
            splits = (("train", er.train[j]), ("val", er.val[j]))
            bad = next((f"{s} loss is {x[0]}" for s, x in splits if not np.isfinite(x).all()), None)
            if bad is not None:  # a quarantine, as a non-finite training loss is
                self.quarantine(m, int(self.step[m]), bad)
                continue
            for split, (loss, acc) in splits:
                self.history.metrics(m, er.epoch, split, float(loss), float(acc))
                if self.tracker is not None:
                    self.tracker.epoch(m, er.epoch, split, float(loss), float(acc))
            self.val_acc[m] = er.val[j][1]
        if self.val_labels is None or not models:
            return
        stored = self.history.val_probs(er.epoch, dict(zip(models, er.val_probs, strict=True)))
        members = [m for m in range(self.count) if m not in self.failed]
        if set(members) <= stored:  # the epoch is complete: read them all once
            got = self.history.load_val_probs(er.epoch)
            ok = [got[m] for m in members if np.isfinite(got[m]).all()]  # not the quarantined
            self.history.drop_val_probs(er.epoch)  # scored: no longer needed
            if ok:
                s = score(ensemble_probs(ok), self.val_labels)
                self.history.metrics(ENSEMBLE, er.epoch, "val", s["nll"], s["accuracy"])
                if self.tracker is not None:
                    self.tracker.ensemble(er.epoch, s["nll"], s["accuracy"])
                    own = self.history.conn.execute(  # personal: each member on its own rows
                        "SELECT AVG(loss), AVG(accuracy) FROM metrics WHERE epoch = ? AND"
                        " split = 'val' AND model >= 0",
                        (er.epoch,),
                    ).fetchone()
                    self.tracker.personal(er.epoch, *own)

    def finish(self, model: int, step: int, failed: bool = False, **detail) -> None:
        """The model stops training: no further decisions involve it. Its `finished` (or
        `failed`) event is recorded once, even when a resumed job finishes it again."""
        self.active[model] = False
        self.step[model] = max(self.step[model], step)
        if failed:
            self.failed.add(model)
        if model in self.ended and not (failed and model not in self.failed_recorded):
            return
        self.ended.add(model)
        if failed:
            self.failed_recorded.add(model)
        self.history.event("failed" if failed else "finished", model, step, **detail)
        if self.tracker is not None and not self.active.any():  # the job is over
            self.tracker.close()

    def track(self) -> None:
        """The coordination counts so far, at this round, to TensorBoard."""
        if self.tracker is not None:
            kept = self.merges - self.rejected
            self.tracker.round(self.rounds, self.merges, kept, self.drifts, self.rejected)

    def fail(self, models: list[int], detail: dict) -> None:
        """A worker is gone for good: its models are recorded as failed, out of the job."""
        with self.history.tx():
            for m in models:
                if self.active[m]:
                    self.finish(m, int(self.step[m]), True, **detail)

    # --- the synchronous barrier -----------------------------------------------------------
    def frontier(self) -> float:
        """The step every model still training has reported up to (inf when none is)."""
        live = self.reported[self.active]
        return float(live.min()) if len(live) else math.inf

    # --- decisions -----------------------------------------------------------------------
    def round_every(self) -> int:
        return self.cfg.coordinator.round_every or max(1, int(self.active.sum()))

    def round_due(self) -> bool:
        """A round runs once enough has been published since the last, and always as the
        job ends (every model still training has finished): federated averaging's last
        aggregation, so the members end on a decision rather than on local steps."""
        ending = bool(self.finishing) and all(
            self.finishing.get(m) is not None for m in np.flatnonzero(self.active)
        )
        return self.policy.coordinates and (self.since_round >= self.round_every() or ending)

    def run_round(self) -> list[Instruction]:
        self.since_round = 0
        eligible = self.known & self.active & ~self.quarantined
        if self.cfg.compat.fn == "cka" and self.policy.uses_compat:  # function space:
            eligible &= self.has_features  # only models whose outputs we know
        models = np.flatnonzero(eligible)
        views = self.views(models) if self.policy.uses_compat else {}
        if len(models) < 2 and not views:
            return []
        counts = {
            (kind, int(m)): self.per_epoch.get((kind, int(m), int(self.epoch[m])), 0)
            for m in models
            for kind in ("merge", "drift")
        }
        layers = [n for n in self.layers if n in views or not self.policy.uses_compat]
        step = int(self.step[models].min()) if len(models) else 0
        decided = self.policy.decide(Round(models, views, counts, self.pool, layers, step))
        # Peers are fixed: instructions addressed to them are not given.
        given = [i for i in decided.instructions if i.model < self.count]
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        new = [apply_instruction(self.bank.row(i.model, i.layer), i, lo, hi) for i in given]
        kept = [i for i in decided.records if i.model < self.count]  # recorded, not sent
        records = []
        for ins in [*given, *kept]:
            m = ins.model
            epoch = int(self.epoch[m])
            key = (ins.kind, m, epoch)
            self.per_epoch[key] = self.per_epoch.get(key, 0) + 1
            merges = self.per_epoch.get(("merge", m, epoch), 0)
            records.append((ins, int(self.step[m]), epoch, merges))
        compat = decided.compat
        if compat is None:
            compat = {layer: (v.models, v.compat) for layer, v in views.items()}
        groups = decided.groups if decided.groups is not None else components(models, given)
        with self.history.tx():  # the round, its instructions and new generations: one commit
            round_id = self.history.round(
                models.tolist(),
                compat,
                records,
                policy=self.cfg.policy.model_dump(mode="json"),
                groups=groups,
                state=self.policy.state(),
            )
            del compat
            views.clear()  # the matrices are recorded: free them (600 MB at M = 4,096)
            for ins, t in zip(given, new, strict=True):  # recorded first: nothing is sent
                self.bank.write(ins.model, {ins.layer: t})  # that the history lacks
                step = int(self.step[ins.model])
                self.mailbox[ins.model].append(replace(ins, round=round_id, step=step))
            self.snapshot(sorted({ins.model for ins in given}), round_id)  # one per change
        self.rounds += 1
        self.groups = groups
        # counted per instruction: once for each model a decision changes
        self.merges += sum(i.kind == "merge" for i in given)
        self.drifts += sum(i.kind == "drift" for i in [*given, *kept])
        self.track()
        return given

    def views(self, models: np.ndarray) -> dict[str, LayerView]:
        """Compatibility (compat.fn) among the round's models on each coordinated layer;
        fixed peers join the layer their tether belongs to."""
        views = {}
        for layer in self.layers:
            rows = np.concatenate([models, self.peer_rows.get(layer, [])]).astype(np.int64)
            if len(rows) >= 2:
                views[layer] = LayerView(rows, *self.layer_compat(layer, rows))
        return views

    def layer_compat(self, layer: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Compatibility and squared tether distances among `rows`, each (k, k).

        Computed in float64, kept as float32: the history stores float32, so decisions are
        taken on the very values `--explain` shows, and a round's matrices take half the
        memory (67 MB each per layer at M = 4,096). The policy only tests distances against
        SAME_TOL, and repulsion upcasts them again."""
        cc = self.cfg.compat
        if self.features is None or cc.fn != "cka":
            return self.bank.compat(layer, cc.fn, rows, cc.normalize, dtype=np.float32)
        else:
            g = self.bank.gram(layer)[np.ix_(rows, rows)].astype(np.float64)
            sq = maths.sq_dist_from_gram(g)
            c = self.features.compat(layer, "cosine", rows)[0]  # linear CKA
            if cc.normalize == "zscore":
                c = maths.zscore_offdiag(c, same=sq <= SAME_TOL)
        return c.astype(np.float32), sq.astype(np.float32)

    def snapshot(self, models: list[int], round_id: int | None) -> None:
        """A new tether generation for each of `models`, in one file."""
        rows = []
        for m in models:
            self.generation[m] += 1
            tethers = {n: self.bank.row(m, n) for n in self.bank.shapes}  # views: saved now
            rows.append((m, int(self.generation[m]), round_id, int(self.step[m]), tethers))
        self.history.generations(rows)

    # --- observers -----------------------------------------------------------------------
    def progress(self) -> dict:
        return {
            "rounds": self.rounds,
            "merges": self.merges,  # merge instructions given (each model's side counts)
            "merges_kept": self.merges - self.rejected,
            "drifts": self.drifts,
            "rejected": self.rejected,
            "publications": self.publications,
            "groups": self.groups,
            "peak_rss_mb": peak_rss_mb(),
            "staleness": spread(self.staleness),
            "models": [
                {
                    "model": m,
                    "step": int(self.step[m]),
                    "epoch": int(self.epoch[m]),
                    "loss": float(self.loss[m]),
                    "val_acc": float(self.val_acc[m]),
                    "active": bool(self.active[m]),
                    "quarantined": bool(self.quarantined[m]),
                    "idle_seconds": time.time() - float(self.contact[m]),
                }
                for m in range(self.count)
            ],
        }

    def tethers(self, model: int) -> dict[str, np.ndarray]:
        return self.bank.tethers(model)


def components(models: np.ndarray, given: list[Instruction]) -> list[list[int]]:
    """The groups a round's merges join: connected components of its sharing graph (each
    member linked to the members of its merge targets), among the round's models."""
    parent = {int(m): int(m) for m in models}

    def root(m: int) -> int:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for ins in given:
        if ins.kind == "merge":
            for j in ins.group:
                if j in parent and ins.model in parent:
                    parent[root(j)] = root(ins.model)
    out: dict[int, list[int]] = {}
    for m in parent:
        out.setdefault(root(m), []).append(m)
    return sorted(out.values())


def spread(xs: list[int]) -> dict | None:
    """Mean and max of instruction staleness in steps (None before any was applied)."""
    if not xs:
        return None
    return {"applied": len(xs), "mean": float(np.mean(xs)), "max": int(max(xs))}
