"""The coordinator: stack reports in, merge/drift instructions out, everything recorded.

Plain Python: the Ray actor (ensemble.runtime.service) and the in-process job
(ensemble.runtime.job) both wrap it. It is built from a `CoordinatorState` (fresh, or what a
history holds) and the `HistoryWriter` it records into; its constructor does no I/O.

Tethers change only through instructions, so the coordinator applies each instruction to
its bank when it decides it. A model's bank row is therefore what its worker last reported
with the mail it has not received yet applied on top: the bank equals what every worker
holds once it has applied its mail.

The coordinator decides (it calls the policy, computes compatibility); where each model
stands is its `Roster`, what it records goes through its `Recorder`, and the mail it sends
is its `Dispatch`.
"""

from __future__ import annotations

import numpy as np

from ensemble.config import Config
from ensemble.coordination.compat import TetherBank, layer_compat, peer_bank
from ensemble.coordination.dispatch import Dispatch
from ensemble.coordination.policies import LayerView, Population, Round, make_policy, settings_of
from ensemble.coordination.recording import Recorder
from ensemble.coordination.recording import peak_rss_mb as peak_rss_mb  # benchmarks import it
from ensemble.coordination.roster import Roster
from ensemble.coordination.targets import Pool
from ensemble.data.groups import true_groups
from ensemble.history import HistoryWriter
from ensemble.history.records import CoordinatorState
from ensemble.protocol import (
    EpochReport,
    Instruction,
    JoinRequest,
    Rejection,
    Reply,
    StackReport,
    apply_instruction,
)


def _part(part: str, name: str) -> property:
    """A read-only attribute of the coordinator that one of its parts holds."""
    return property(lambda self: getattr(getattr(self, part), name))


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
        self.bank, self.peer_rows = peer_bank(m, shapes, peers or {})
        settings = settings_of(cfg.policy)
        self.layers = list(getattr(settings, "layers", None) or shapes)
        # Function space: compat from each model's probe-batch Grams, not from its tethers;
        # the bank is made on the first publication that carries them.
        self.features: TetherBank | None = None
        self.params: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # latest W, b
        self.pool = Pool(self.bank, self.params, m, list(shapes))
        bounds = (cfg.tether.min, cfg.tether.max)
        population = Population(m, list(shapes), true_groups(m, cfg.data.groups), bounds)
        self.policy = make_policy(cfg, population)
        if state.policy:  # what the policy kept, as the history last saved it
            self.policy.restore(state.policy)
        self.history = history
        self.val_labels = val_labels
        self.record = Recorder(history, state, cfg.tracking.tensorboard)
        self.roster = Roster(m, state)
        self.dispatch = Dispatch(self.bank, m, bounds)
        self.dispatch.restore(state.tethers)
        self.per_epoch = dict(state.per_epoch)  # (kind, model, epoch) -> decisions
        self.since_round = 0

    # what other modules read of the parts
    known = _part("roster", "known")
    active = _part("roster", "active")
    quarantined = _part("roster", "quarantined")
    rounds = _part("record", "rounds")
    merges = _part("record", "merges")
    drifts = _part("record", "drifts")
    rejected = _part("record", "rejected")
    publications = _part("record", "publications")
    groups = _part("record", "groups")

    @property
    def mailbox(self) -> dict[int, list[Instruction]]:
        return self.dispatch.mailbox

    @mailbox.setter
    def mailbox(self, value: dict[int, list[Instruction]]) -> None:
        self.dispatch.mailbox = value

    # --- worker-facing -------------------------------------------------------------------
    def join(self, req: JoinRequest) -> Reply:
        """A stack starts, or rejoins after a restart or a resume: its tethers may be older
        than the bank's, so each known model's pending mail becomes one `sync` per layer."""
        with self.history.tx():
            for m in req.models.tolist():
                self.roster.join(m)
                if req.reason == "started" and not self.roster.known[m]:
                    self.record.event("started", m, req.step, **req.where)
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
        live = r.models[~(r.failed if r.failed is not None else np.zeros(len(r.models), bool))]
        self.roster.heard(r.models, r.step)
        with self.history.tx():
            for ev in r.events:  # quarantine first: a poisoned model is never banked
                self.record.event(ev.kind, ev.model, ev.step, **ev.detail)
                if ev.kind == "quarantined":
                    self.roster.quarantine(ev.model)
            for m, why in r.rejoined:
                self.rejoin(m, r.step, why)
            for rej in r.rejections:
                self.reject(rej)
            self.record_publications(r)
            self.roster.advanced(r.models, live, r.step, r.epoch, r.losses)
            if r.epoch_report is not None:
                self.record_epoch(r.epoch_report)
            self.record.staleness += list(r.staleness)
            if r.finished is not None:
                self.stopped(r)

    def stopped(self, r: StackReport) -> None:
        """The models `r` says stopped for good: the failed ones, and those already out,
        finish now; the others at the end of the boundary (its round still includes them)."""
        for i in np.flatnonzero(r.finished):
            m = int(r.models[i])
            if r.failed[i] or not self.roster.active[m]:
                self.finish(m, r.step, bool(r.failed[i]))
            else:
                self.roster.finishing[m] = r.step

    def settle(self) -> None:
        """After the boundary's round: the models that finished there stop taking part."""
        if not self.roster.finishing:
            return
        with self.history.tx():
            for m, step in sorted(self.roster.finishing.items()):
                self.finish(m, step)
        self.roster.finishing = {}

    def record_publications(self, r: StackReport) -> None:
        """A report's introduced tethers into the bank; its publications recorded, and what
        the policy needs of them kept."""
        self.introduce(r)
        ids = r.published_ids()
        if not len(ids):
            return
        self.record.published(r, ids)
        self.keep_published(r, ids)
        self.since_round += len(ids)

    def introduce(self, r: StackReport) -> None:
        """Tethers the bank lacked, with their mail on top (non-finite ones are a
        quarantine instead); generation 0 of the models new to the bank."""
        first = []  # generation 0: the tethers a model starts with
        for j, m in enumerate(r.introduced_ids().tolist()):
            tethers = {n: t[j] for n, t in r.tethers.items()}
            bad = next((n for n, t in tethers.items() if not np.isfinite(t).all()), None)
            if bad is not None:  # never in the bank: no partner ever gets it
                self.quarantine(m, r.step, f"tether {bad} has non-finite values")
                continue
            self.dispatch.bank_reported(m, tethers)
            if not self.roster.known[m]:
                self.roster.known[m] = True
                first.append(m)
        self.snapshot(first, None)

    def keep_published(self, r: StackReport, ids: np.ndarray) -> None:
        """The published models' probe features, weights and outputs, for the policy."""
        for j, m in enumerate(ids.tolist()):
            if r.features is not None:
                if self.features is None:
                    shapes = {n: f.shape[1:] for n, f in r.features.items()}
                    self.features = TetherBank(self.count, shapes)
                self.features.write(m, {n: f[j] for n, f in r.features.items()})
                self.roster.has_features[m] = True
            if r.weights is not None:
                self.params[m] = {n: (w[j], b[j]) for n, (w, b) in r.weights.items()}
            if r.outputs is not None:
                self.pool.outputs[m] = r.outputs[j]

    def take_mail(self, models) -> Reply:
        return self.dispatch.take(models, self.roster)

    def quarantine(self, model: int, step: int, reason: str) -> None:
        """A model with non-finite loss or tethers: never a partner until it rejoins."""
        if self.roster.quarantine(model):
            self.record.event("quarantined", model, step, reason=reason)

    def rejoin(self, model: int, step: int, reason: str, where: dict | None = None) -> None:
        """A model restarted, resumed or rolled back: its tethers are older than the bank's.
        Replace its pending mail by one `sync` per layer (the bank's rows, which already
        include every decision made for it), and let it take part again."""
        pending = len(self.mailbox[model])
        self.roster.rejoin(model, step)
        known = bool(self.roster.known[model])
        self.record.rejoined(model, step, reason, pending, known, where)
        self.dispatch.resync(model, known)

    def reject(self, rej: Rejection) -> None:
        """The merge guard undid `rej.merges`: each becomes a `rejected` event, and the
        model's tethers as its worker holds them again (with its newer mail on top) become
        the bank's row at once, and a new generation."""
        self.record.rejected_merges(rej)
        self.dispatch.bank_reported(rej.model, rej.tethers)
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
                self.quarantine(m, int(self.roster.step[m]), bad)
                continue
            self.record.member_epoch(m, er.epoch, er.train[j], er.val[j])
            self.roster.val_acc[m] = er.val[j][1]
        if self.val_labels is None or not models:
            return
        probs = dict(zip(models, er.val_probs, strict=True))
        self.record.ensemble_epoch(er.epoch, probs, self.roster.members(), self.val_labels)

    def finish(self, model: int, step: int, failed: bool = False, **detail) -> None:
        """The model stops training: no further decisions involve it. Its `finished` (or
        `failed`) event is recorded once, even when a resumed job finishes it again."""
        kind = self.roster.finish(model, step, failed)
        if kind is not None:
            self.record.ended(kind, model, step, detail, job_over=not self.roster.active.any())

    def fail(self, models: list[int], detail: dict) -> None:
        """A worker is gone for good: its models are recorded as failed, out of the job."""
        with self.history.tx():
            for m in models:
                if self.roster.active[m]:
                    self.finish(m, int(self.roster.step[m]), True, **detail)

    # --- the synchronous barrier -----------------------------------------------------------
    def frontier(self) -> float:
        """The step every model still training has reported up to (inf when none is)."""
        return self.roster.frontier()

    # --- decisions -----------------------------------------------------------------------
    def round_every(self) -> int:
        return self.cfg.coordinator.round_every or max(1, int(self.roster.active.sum()))

    def round_due(self) -> bool:
        """A round runs once enough has been published since the last, and always as the
        job ends (every model still training has finished): federated averaging's last
        aggregation, so the members end on a decision rather than on local steps."""
        ending = self.roster.ending()
        return self.policy.coordinates and (self.since_round >= self.round_every() or ending)

    def run_round(self) -> list[Instruction]:
        """A round: the policy decides among the eligible models; its decisions are
        recorded, then applied to the bank and posted. The instructions given."""
        self.since_round = 0
        uses_compat = self.policy.uses_compat
        # function space: only the models whose outputs we know
        models = self.roster.eligible(need_features=self.cfg.compat.fn == "cka" and uses_compat)
        views = self.views(models) if uses_compat else {}
        if len(models) < 2 and not views:
            return []
        decided = self.decide(models, views)
        # Peers are fixed: instructions addressed to them are not given.
        given = [i for i in decided.instructions if i.model < self.count]
        lo, hi = self.cfg.tether.min, self.cfg.tether.max
        new = [apply_instruction(self.bank.row(i.model, i.layer), i, lo, hi) for i in given]
        kept = [i for i in decided.records if i.model < self.count]  # recorded, not sent
        records = self.count_decisions([*given, *kept])
        compat = decided.compat
        if compat is None:
            compat = {layer: (v.models, v.compat) for layer, v in views.items()}
        groups = decided.groups if decided.groups is not None else components(models, given)
        with self.history.tx():  # the round, its instructions and new generations: one commit
            settings, state = self.cfg.policy.model_dump(mode="json"), self.policy.state()
            round_id = self.record.round(models, compat, records, settings, groups, state)
            del compat
            views.clear()  # the matrices are recorded: free them (600 MB at M = 4,096)
            # recorded first: nothing is sent that the history lacks
            self.dispatch.send(given, new, round_id, self.roster.step)
            self.snapshot(sorted({ins.model for ins in given}), round_id)  # one per change
        self.record.counted(given, kept, groups)
        return given

    def decide(self, models: np.ndarray, views: dict[str, LayerView]):
        """The policy's decision on the round's models and their compat views."""
        counts = {
            (kind, int(m)): self.per_epoch.get((kind, int(m), int(self.roster.epoch[m])), 0)
            for m in models
            for kind in ("merge", "drift")
        }
        layers = [n for n in self.layers if n in views or not self.policy.uses_compat]
        step = int(self.roster.step[models].min()) if len(models) else 0
        return self.policy.decide(Round(models, views, counts, self.pool, layers, step))

    def count_decisions(self, decisions: list[Instruction]) -> list[tuple]:
        """Count each decision against its model's epoch; the history's rows for them:
        (instruction, step, epoch, the model's merges this epoch so far)."""
        records = []
        for ins in decisions:
            m = ins.model
            epoch = int(self.roster.epoch[m])
            key = (ins.kind, m, epoch)
            self.per_epoch[key] = self.per_epoch.get(key, 0) + 1
            merges = self.per_epoch.get(("merge", m, epoch), 0)
            records.append((ins, int(self.roster.step[m]), epoch, merges))
        return records

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
        """Compatibility and squared tether distances among `rows` (see `layer_compat`)."""
        return layer_compat(self.bank, self.features, self.cfg.compat, layer, rows)

    def snapshot(self, models: list[int], round_id: int | None) -> None:
        """A new tether generation for each of `models`, in one file."""
        self.record.generations(self.roster, self.bank, models, round_id)

    # --- observers -----------------------------------------------------------------------
    def progress(self) -> dict:
        return self.record.progress(self.roster)

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
