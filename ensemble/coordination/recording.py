"""What the coordinator records: rounds, generations, publications, events and scores in the
history, TensorBoard scalars beside it, and the progress it reports. No decision is taken
here: the coordinator decides, then records through a `Recorder`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ensemble.coordination.compat import TetherBank
from ensemble.coordination.roster import Roster
from ensemble.history import HistoryWriter
from ensemble.history.records import CoordinatorState
from ensemble.outputs.evaluation import ensemble_probs, score
from ensemble.protocol import ENSEMBLE, Instruction, Rejection, StackReport


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


def spread(xs: list[int]) -> dict | None:
    """Mean and max of instruction staleness in steps (None before any was applied)."""
    if not xs:
        return None
    return {"applied": len(xs), "mean": float(np.mean(xs)), "max": int(max(xs))}


class Recorder:
    """The coordinator's history writer and TensorBoard tracker, with the counts so far."""

    def __init__(
        self, history: HistoryWriter, state: CoordinatorState | None = None, tensorboard=False
    ):
        state = state or CoordinatorState()
        self.history = history
        self.tracker = None  # TensorBoard scalars (tracking.tensorboard), beside the history
        if tensorboard:
            from ensemble.outputs.tracking import TensorBoard

            self.tracker = TensorBoard(history.run_dir)
        self.rounds, self.merges, self.drifts = state.rounds, state.merges, state.drifts
        self.publications, self.rejected = state.publications, state.rejected
        self.staleness: list[int] = []
        self.groups: list[list[int]] | None = state.groups  # what the last round saw

    # --- events ----------------------------------------------------------------------------
    def event(self, kind: str, model: int | None = None, step: int | None = None, **detail):
        self.history.event(kind, model, step, **detail)

    def rejoined(self, model: int, step: int, reason: str, pending: int, synced: bool, where):
        self.history.event(
            reason,
            model,
            step,
            pending_instructions=pending,
            synced=synced,
            **(where or {}),
        )

    def rejected_merges(self, rej: Rejection) -> None:
        """Each merge the guard undid becomes a `rejected` event, and is counted."""
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

    def ended(self, kind: str, model: int, step: int, detail: dict, job_over: bool) -> None:
        """A model's `finished` or `failed` event; TensorBoard closes when the job is over."""
        self.history.event(kind, model, step, **detail)
        if self.tracker is not None and job_over:
            self.tracker.close()

    # --- tethers and publications --------------------------------------------------------
    def generations(self, roster: Roster, bank: TetherBank, models: list[int], round_id):
        """A new tether generation for each of `models`, in one file."""
        rows = []
        for m, gen in zip(models, roster.next_generation(models), strict=True):
            tethers = {n: bank.row(m, n) for n in bank.shapes}  # views: saved now
            rows.append((m, gen, round_id, int(roster.step[m]), tethers))
        self.history.generations(rows)

    def published(self, r: StackReport, ids: np.ndarray) -> None:
        """One publication row for each of `ids` (models of report `r`), with its probes."""
        row = {m: i for i, m in enumerate(r.models.tolist())}
        p = r.probes or {}
        cols = [p.get(k) for k in ("probe1", "probe2", "entropy", "sparsity")]
        rows = []
        for m in ids.tolist():
            i = row[m]
            extra = [None if c is None or not math.isfinite(c[i]) else float(c[i]) for c in cols]
            rows.append((m, r.step, r.epoch, float(r.losses[i]), float(r.grad_norms[i]), *extra))
        self.publications += self.history.publications(rows)  # new rows, not replays

    # --- scores ----------------------------------------------------------------------------
    def member_epoch(self, model: int, epoch: int, train, val) -> None:
        """A member's (loss, accuracy) on each split at the end of `epoch`."""
        for split, (loss, acc) in (("train", train), ("val", val)):
            self.history.metrics(model, epoch, split, float(loss), float(acc))
            if self.tracker is not None:
                self.tracker.epoch(model, epoch, split, float(loss), float(acc))

    def ensemble_epoch(self, epoch: int, probs: dict, members: list[int], labels) -> None:
        """Keep the members' validation probabilities of `epoch`; once every one of
        `members` has them, the ensemble's score under model -1 (the probabilities are
        kept in the history, so this survives a restart)."""
        stored = self.history.val_probs(epoch, probs)
        if not set(members) <= stored:
            return
        got = self.history.load_val_probs(epoch)  # the epoch is complete: read them all once
        ok = [got[m] for m in members if np.isfinite(got[m]).all()]  # not the quarantined
        self.history.drop_val_probs(epoch)  # scored: no longer needed
        if not ok:
            return
        s = score(ensemble_probs(ok), labels)
        self.history.metrics(ENSEMBLE, epoch, "val", s["nll"], s["accuracy"])
        if self.tracker is not None:
            self.tracker.ensemble(epoch, s["nll"], s["accuracy"])
            own = self.history.conn.execute(  # personal: each member on its own rows
                "SELECT AVG(loss), AVG(accuracy) FROM metrics WHERE epoch = ? AND"
                " split = 'val' AND model >= 0",
                (epoch,),
            ).fetchone()
            self.tracker.personal(epoch, *own)

    # --- rounds ----------------------------------------------------------------------------
    def round(self, models: np.ndarray, compat, records, policy, groups, state) -> int:
        """The round's row, its compat matrices and its instructions: the round's id."""
        return self.history.round(
            models.tolist(), compat, records, policy=policy, groups=groups, state=state
        )

    def counted(self, given: list[Instruction], kept: list[Instruction], groups) -> None:
        """A round is over: its counts, per instruction (once for each model a decision
        changes), and the groups it saw."""
        self.rounds += 1
        self.groups = groups
        self.merges += sum(i.kind == "merge" for i in given)
        self.drifts += sum(i.kind == "drift" for i in [*given, *kept])
        self.track()

    def track(self) -> None:
        """The coordination counts so far, at this round, to TensorBoard."""
        if self.tracker is not None:
            kept = self.merges - self.rejected
            self.tracker.round(self.rounds, self.merges, kept, self.drifts, self.rejected)

    # --- observers -----------------------------------------------------------------------
    def progress(self, roster: Roster) -> dict:
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
            "models": roster.rows(),
        }
