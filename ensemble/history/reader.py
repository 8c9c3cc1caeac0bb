"""Read-only queries over a history file. HistoryReader opens it and answers for events,
metrics and the coordinator's saved state; its queries over decisions (filters,
explanations, lineage) are in `decisions.py`, over tethers and compat in `tethers.py`."""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from pathlib import Path

from ensemble.errors import RunDirError
from ensemble.history.decisions import DecisionQueries
from ensemble.history.records import (
    CoordinatorState,
    Event,
    Metric,
)
from ensemble.history.schema import check_schema
from ensemble.history.schema import eq as _eq
from ensemble.history.tethers import TetherQueries


class HistoryReader(DecisionQueries, TetherQueries):
    """Queries over one history.sqlite; every method returns plain typed records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_dir = self.path.parent
        if not self.path.is_file():
            raise RunDirError(f"{self.path}: history file not found")
        # A finished history (no -wal beside it: no writer) is read as immutable, so that
        # reading it leaves no -wal or -shm file behind; a live one through its WAL.
        live = self.path.with_name(self.path.name + "-wal").exists()
        uri = f"file:{self.path.resolve()}?mode=ro" + ("" if live else "&immutable=1")
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
        except sqlite3.OperationalError as e:
            raise RunDirError(f"{self.path}: cannot open history ({e})") from None
        self.version = check_schema(self.conn, self.path)

    def _rows(self, head: str, conds: list, order: str, limit: int | None = None):
        """`head WHERE conds ORDER BY order [LIMIT limit]`; conds are (sql, args) pairs,
        None for a filter not given."""
        conds = [c for c in conds if c is not None]
        sql = f"{head} WHERE {' AND '.join(c for c, _ in conds) or '1'} ORDER BY {order}"
        args = [a for _, values in conds for a in values]
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return self.conn.execute(sql, args)

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def model_count(self) -> int | None:
        """How many models the job trains (models.count of its config), if recorded."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        match = re.search(r"^models:\s*\n\s+count:\s*(\d+)", row[0] if row else "", re.M)
        return int(match.group(1)) if match else None

    def events(self, kind: str | None = None, model: int | None = None) -> list[Event]:
        rows = self._rows(
            "SELECT id, model, kind, step, detail, t FROM events",
            [_eq("kind = ?", kind), _eq("model = ?", model)],
            "id",
        )
        return [Event(i, m, k, s, json.loads(d), t) for i, m, k, s, d, t in rows]

    def metrics(self, model: int | None = None) -> list[Metric]:
        rows = self._rows(
            "SELECT model, epoch, split, loss, accuracy FROM metrics",
            [_eq("model = ?", model)],
            "model, epoch, split",
        )
        return [Metric(*r) for r in rows]

    def count(self, table: str) -> int:
        assert table in {
            "publications",
            "rounds",
            "compat",
            "instructions",
            "metrics",
            "events",
            "generations",
        }
        return self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def models(self) -> list[int]:
        """Every model that published at least once."""
        return [
            r
            for (r,) in self.conn.execute("SELECT DISTINCT model FROM publications ORDER BY model")
        ]

    def layers(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT layer FROM compat ORDER BY layer")]

    def coordinator_state(self, count: int) -> CoordinatorState:
        """Everything a restarted coordinator (or a resumed job's) rebuilds itself from."""
        q = self.conn.execute
        st = CoordinatorState(restored=True)
        for m in range(count):
            gens = self.generations(m)
            if gens:
                st.generation[m] = gens[-1].generation
                st.tethers[m] = self.tethers(m)
        for m, step, epoch, loss in q(
            "SELECT model, step, epoch, loss FROM publications WHERE id IN"
            " (SELECT MAX(id) FROM publications GROUP BY model)"
        ):
            st.step[m], st.epoch[m], st.loss[m] = step, epoch, loss
        st.failed = {e.model for e in self.events(kind="failed")}
        st.finished = st.failed | {e.model for e in self.events(kind="finished")}
        for kind, model, epoch, n in q(
            "SELECT kind, model, epoch, COUNT(*) FROM instructions GROUP BY kind, model, epoch"
        ):
            st.per_epoch[(kind, model, epoch)] = n
        st.rounds = self.count("rounds")
        st.publications = self.count("publications")
        for kind, n in q("SELECT kind, COUNT(*) FROM instructions GROUP BY kind"):
            if kind in ("merge", "drift"):  # per instruction, as the coordinator counts
                setattr(st, f"{kind}s", n)
        st.rejected = q("SELECT COUNT(*) FROM events WHERE kind = 'rejected'").fetchone()[0]
        st.policy = self.policy_state()
        found = self.round_groups()
        st.groups = found[-1][1] if found else None
        return st

    def close(self):
        self.conn.close()


def _naming_the_file(method):
    """A query that reads a damaged database fails naming the file, not with SQLite's
    bare 'database disk image is malformed'."""

    @functools.wraps(method)
    def query(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise RunDirError(f"{self.path}: the history is damaged ({e})") from None

    return query


for _cls in (HistoryReader, DecisionQueries, TetherQueries):
    for _name, _method in list(vars(_cls).items()):
        if callable(_method) and not _name.startswith("_") and _name != "close":
            setattr(HistoryReader, _name, _naming_the_file(_method))
