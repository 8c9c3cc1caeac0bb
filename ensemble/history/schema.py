"""The versioned SQLite schema of a history file, with indexes for the query filters."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import numpy as np

from ensemble.errors import RunDirError

SCHEMA_VERSION = 3
READABLE = (1, 2, 3)  # version 1 kept one row per pair; readers still read 1 and 2

# Version 2 keeps a round's compatibility on a layer as one row: the model ids (int32) and
# the upper triangle of the (k, k) matrix, row by row (float32), as two BLOBs. Version 1
# kept one row per pair: M^2/2 rows per layer and round, which stopped rounds at M = 1,024.
# Version 2's generations share one file per round, each under a key prefix (`key`);
# identical tethers in one round (a merged pair, a FedAvg population) are stored once.
# Version 3 names each instruction's target group (the members whose mean it moves
# toward: a pair's partner, or a set of members stored once a round in `member_sets`, with
# the weights of a weighted mean), stores each round's policy settings (JSON) and the
# groups it saw, and the policy's own state (`policy_state`, the latest only). Versions 1
# and 2 gave a group target as partner -1; readers turn that into the round's members.

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE publications (
    id INTEGER PRIMARY KEY, model INTEGER NOT NULL, step INTEGER NOT NULL,
    epoch INTEGER NOT NULL, loss REAL, grad_norm REAL, t REAL NOT NULL,
    probe1 REAL, probe2 REAL, entropy REAL, sparsity REAL,
    UNIQUE (model, step));
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY, t REAL NOT NULL, models TEXT NOT NULL, instructions INTEGER NOT NULL,
    policy TEXT NOT NULL, groups TEXT);
CREATE TABLE compat (
    round INTEGER NOT NULL, layer TEXT NOT NULL, models BLOB NOT NULL, upper BLOB NOT NULL,
    PRIMARY KEY (round, layer));
CREATE TABLE member_sets (
    round INTEGER NOT NULL, id INTEGER NOT NULL, members BLOB NOT NULL,
    PRIMARY KEY (round, id));
CREATE TABLE instructions (
    id INTEGER PRIMARY KEY, round INTEGER NOT NULL, kind TEXT NOT NULL,
    model INTEGER NOT NULL, partner INTEGER, member_set INTEGER, weights BLOB,
    layer TEXT NOT NULL, rate REAL NOT NULL, compat REAL, rule TEXT NOT NULL,
    step INTEGER NOT NULL, epoch INTEGER NOT NULL, merges_in_epoch INTEGER NOT NULL,
    t REAL NOT NULL);
CREATE TABLE policy_state (
    key TEXT PRIMARY KEY, round INTEGER NOT NULL, state BLOB NOT NULL);
CREATE INDEX instructions_kind ON instructions (kind, round);
CREATE INDEX instructions_model ON instructions (model, round);
CREATE INDEX instructions_partner ON instructions (partner, round);
CREATE INDEX instructions_layer ON instructions (layer, round);
CREATE INDEX instructions_step ON instructions (step);
CREATE TABLE generations (
    model INTEGER NOT NULL, generation INTEGER NOT NULL, round INTEGER,
    step INTEGER NOT NULL, path TEXT, t REAL NOT NULL, key TEXT,
    PRIMARY KEY (model, generation));
CREATE INDEX generations_path ON generations (path);
CREATE TABLE metrics (
    model INTEGER NOT NULL, epoch INTEGER NOT NULL, split TEXT NOT NULL,
    loss REAL NOT NULL, accuracy REAL NOT NULL, t REAL NOT NULL,
    PRIMARY KEY (model, epoch, split));
CREATE TABLE val_probs (
    model INTEGER NOT NULL, epoch INTEGER NOT NULL, shape TEXT NOT NULL, probs BLOB NOT NULL,
    PRIMARY KEY (model, epoch));
CREATE TABLE events (
    id INTEGER PRIMARY KEY, model INTEGER, kind TEXT NOT NULL, step INTEGER,
    detail TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX events_kind ON events (kind, model);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A writer's connection: WAL, so readers and the single writer never block each other."""
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def check_schema(conn: sqlite3.Connection, path: Path, readable: tuple[int, ...] = READABLE) -> int:
    """The file's schema version; refuse a version not in `readable`, or a file that is not
    a history at all."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
    except sqlite3.DatabaseError as e:
        raise RunDirError(f"{path}: not a history database ({e})") from None
    if not has_meta:
        raise RunDirError(f"{path}: not a tether-ensemble history (no meta table)")
    if version not in readable:
        which = " or ".join(str(v) for v in readable)
        raise RunDirError(
            f"{path}: history schema version {version}, this version of tether-ensemble "
            f"{'reads' if len(readable) > 1 else 'writes'} version {which}; "
            "use the matching release to read it"
        )
    return version


def pack_upper(ids, mat) -> tuple[bytes, bytes]:
    """(model ids, (k, k) matrix) -> the two BLOBs of a version-2 compat row."""
    ids = np.asarray(ids, dtype=np.int32)
    return ids.tobytes(), np.asarray(mat, dtype=np.float32)[_upper(len(ids))].tobytes()


@functools.lru_cache(maxsize=4)
def _upper(k: int) -> np.ndarray:
    """The (k, k) mask of the strict upper triangle; boolean indexing reads it row by row,
    the order the BLOB keeps."""
    return np.triu(np.ones((k, k), dtype=bool), k=1)


def unpack_upper(ids_blob: bytes, upper_blob: bytes) -> tuple[list[int], np.ndarray]:
    """The inverse: (model ids, (k, k) float64 matrix, NaN diagonal)."""
    ids = np.frombuffer(ids_blob, dtype=np.int32)
    k = len(ids)
    mat = np.full((k, k), np.nan)
    mat[_upper(k)] = np.frombuffer(upper_blob, dtype=np.float32)
    mat.T[_upper(k)] = mat[_upper(k)]  # the mirror: (j, i) <- (i, j), pair by pair
    return ids.tolist(), mat


def eq(sql: str, value) -> tuple[str, tuple] | None:
    """A one-placeholder filter, or None when the value is not given."""
    return None if value is None or value == "" else (sql, (value,))
