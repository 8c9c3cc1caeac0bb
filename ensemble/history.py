"""The durable history: a versioned SQLite file, written by the coordinator, read by anyone.

WAL mode lets readers run while the single writer commits. Every decision is stored with
what it was based on (compat value, thresholds, step, merge count), so a run can be
explained after the fact.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ensemble.errors import RunDirError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE publications (
    id INTEGER PRIMARY KEY, model INTEGER NOT NULL, step INTEGER NOT NULL,
    epoch INTEGER NOT NULL, loss REAL, grad_norm REAL, t REAL NOT NULL,
    UNIQUE (model, step));
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY, t REAL NOT NULL, models TEXT NOT NULL, instructions INTEGER NOT NULL);
CREATE TABLE compat (
    round INTEGER NOT NULL, layer TEXT NOT NULL, i INTEGER NOT NULL, j INTEGER NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (round, layer, i, j));
CREATE TABLE instructions (
    id INTEGER PRIMARY KEY, round INTEGER NOT NULL, kind TEXT NOT NULL,
    model INTEGER NOT NULL, partner INTEGER NOT NULL, layer TEXT NOT NULL,
    rate REAL NOT NULL, compat REAL NOT NULL, rule TEXT NOT NULL,
    merge_above REAL NOT NULL, drift_below REAL NOT NULL,
    step INTEGER NOT NULL, epoch INTEGER NOT NULL, merges_in_epoch INTEGER NOT NULL,
    t REAL NOT NULL);
CREATE INDEX instructions_kind ON instructions (kind, round);
CREATE INDEX instructions_model ON instructions (model, round);
CREATE INDEX instructions_layer ON instructions (layer, round);
CREATE INDEX instructions_step ON instructions (step);
CREATE TABLE metrics (
    model INTEGER NOT NULL, epoch INTEGER NOT NULL, split TEXT NOT NULL,
    loss REAL NOT NULL, accuracy REAL NOT NULL, t REAL NOT NULL,
    PRIMARY KEY (model, epoch, split));
CREATE TABLE events (
    id INTEGER PRIMARY KEY, model INTEGER, kind TEXT NOT NULL, step INTEGER,
    detail TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX events_kind ON events (kind, model);
"""


@dataclass(frozen=True)
class Decision:
    """One merge or drift between two models, as recorded (the pair's lower id first)."""

    id: int
    round: int
    kind: str
    model: int
    partner: int
    layer: str
    rate: float
    compat: float
    rule: str
    merge_above: float
    drift_below: float
    step: int
    epoch: int
    merges_in_epoch: int

    def as_dict(self) -> dict:
        return asdict(self)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class HistoryWriter:
    """The coordinator's single writer. Each method commits one transaction."""

    def __init__(self, path: str | Path, job: str, config_yaml: str):
        self.path = Path(path)
        self.conn = _connect(self.path)
        empty = self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        if empty:  # new, or created empty by a reader that raced us
            with self.conn:
                self.conn.executescript(SCHEMA)
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self.conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [
                        ("job", job),
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("config", config_yaml),
                        ("created", str(time.time())),
                    ],
                )
        else:
            check_schema(self.conn, self.path)

    def publication(self, model: int, step: int, epoch: int, loss: float, grad_norm: float):
        with self.conn:
            self.conn.execute(
                "INSERT OR IGNORE INTO publications (model, step, epoch, loss, grad_norm, t)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (model, step, epoch, loss, grad_norm, time.time()),
            )

    def round(
        self,
        models: list[int],
        compat: dict[str, tuple[list[int], list[list[float]]]],
        rows: list[tuple],
    ) -> int:
        """One decision round: the compat matrices it saw and the instructions it gave.

        rows: (kind, model, partner, layer, rate, compat, rule, merge_above, drift_below,
        step, epoch, merges_in_epoch) per instruction.
        """
        now = time.time()
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO rounds (t, models, instructions) VALUES (?, ?, ?)",
                (now, json.dumps(models), len(rows)),
            )
            rid = cur.lastrowid
            for layer, (ids, mat) in compat.items():
                self.conn.executemany(
                    "INSERT INTO compat VALUES (?, ?, ?, ?, ?)",
                    [
                        (rid, layer, ids[a], ids[b], mat[a][b])
                        for a in range(len(ids))
                        for b in range(a + 1, len(ids))
                    ],
                )
            self.conn.executemany(
                "INSERT INTO instructions (round, kind, model, partner, layer, rate, compat,"
                " rule, merge_above, drift_below, step, epoch, merges_in_epoch, t)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(rid, *r, now) for r in rows],
            )
        return rid

    def metrics(self, model: int, epoch: int, split: str, loss: float, accuracy: float):
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                (model, epoch, split, loss, accuracy, time.time()),
            )

    def event(self, kind: str, model: int | None = None, step: int | None = None, **detail):
        with self.conn:
            self.conn.execute(
                "INSERT INTO events (model, kind, step, detail, t) VALUES (?, ?, ?, ?, ?)",
                (model, kind, step, json.dumps(detail), time.time()),
            )

    def close(self):
        self.conn.close()


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
    except sqlite3.DatabaseError as e:
        raise RunDirError(f"{path}: not a history database ({e})") from None
    if not has_meta:
        raise RunDirError(f"{path}: not a tether-ensemble history (no meta table)")
    if version != SCHEMA_VERSION:
        raise RunDirError(
            f"{path}: history schema version {version}, this version of tether-ensemble reads "
            f"version {SCHEMA_VERSION}; use the matching release to read it"
        )


class HistoryReader:
    """Read-only queries over a history file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise RunDirError(f"{self.path}: history file not found")
        uri = f"file:{self.path.resolve()}?mode=ro"
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=30.0)
        except sqlite3.OperationalError as e:
            raise RunDirError(f"{self.path}: cannot open history ({e})") from None
        check_schema(self.conn, self.path)

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def decisions(self, kind: str | None = None) -> list[Decision]:
        """Merges and drifts, one record per pair (lower model id first), in decision order."""
        sql = (
            "SELECT id, round, kind, model, partner, layer, rate, compat, rule, merge_above,"
            " drift_below, step, epoch, merges_in_epoch FROM instructions WHERE model < partner"
        )
        args: tuple = ()
        if kind:
            sql += " AND kind = ?"
            args = (kind,)
        return [Decision(*row) for row in self.conn.execute(sql + " ORDER BY id", args)]

    def count(self, table: str) -> int:
        assert table in {"publications", "rounds", "compat", "instructions", "metrics", "events"}
        return self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def events(self, kind: str | None = None) -> list[dict]:
        sql, args = "SELECT id, model, kind, step, detail, t FROM events", ()
        if kind:
            sql, args = sql + " WHERE kind = ?", (kind,)
        return [
            {"id": i, "model": m, "kind": k, "step": s, "detail": json.loads(d), "t": t}
            for i, m, k, s, d, t in self.conn.execute(sql + " ORDER BY id", args)
        ]

    def metrics(self) -> list[dict]:
        cols = ("model", "epoch", "split", "loss", "accuracy")
        q = "SELECT model, epoch, split, loss, accuracy FROM metrics ORDER BY model, epoch, split"
        return [dict(zip(cols, r, strict=True)) for r in self.conn.execute(q)]

    def close(self):
        self.conn.close()
