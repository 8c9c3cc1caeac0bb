"""Rebuilding a coordinator's state from its history after it restarts (or a job resumes).

The history is the source of truth: the latest tether generation of each model (always kept
by retention) is exactly its bank row, because tethers change only through decisions and
every decision snapshots the models it changed. What cannot be rebuilt is which decisions
a worker had already received, so every known model is sent a `sync` of its bank row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ensemble.history import HistoryReader

if TYPE_CHECKING:
    from ensemble.coordinator import Coordinator


def restore(c: Coordinator) -> None:
    r = HistoryReader(c.history.path)
    try:
        q = r.conn.execute
        for m in range(c.count):
            gens = r.generations(m)
            if gens:
                c.known[m] = True
                c.generation[m] = gens[-1].generation
                c.bank.write(m, r.tethers(m))
                c.mailbox[m] = c.sync_mail(m)
            last = q(
                "SELECT step, epoch, loss FROM publications WHERE model = ?"
                " ORDER BY id DESC LIMIT 1",
                (m,),
            ).fetchone()
            if last:
                c.step[m], c.epoch[m], c.loss[m] = last
        c.failed |= {e.model for e in r.events(kind="failed")}
        done = {e.model for kind in ("finished", "failed") for e in r.events(kind=kind)}
        for m in done:
            if 0 <= m < c.count:
                c.active[m] = False
        for kind, model, epoch, n in q(
            "SELECT kind, model, epoch, COUNT(*) FROM instructions GROUP BY kind, model, epoch"
        ):
            c.per_epoch[(kind, model, epoch)] = n
        c.rounds = r.count("rounds")
        c.publications = r.count("publications")
        for kind, n in q(
            "SELECT kind, COUNT(*) FROM instructions WHERE model < partner"
            " OR partner >= ? OR partner < 0 GROUP BY kind",
            (c.count,),
        ):
            if kind == "merge":
                c.merges = n
            elif kind == "drift":
                c.drifts = n
        c.rejected = q("SELECT COUNT(*) FROM events WHERE kind = 'rejected'").fetchone()[0]
    finally:
        r.close()
    c.history.event(
        "coordinator_restored",
        None,
        None,
        rounds=c.rounds,
        known=int(c.known.sum()),
        publications=c.publications,
    )
