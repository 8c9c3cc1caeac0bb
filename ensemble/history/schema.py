"""The versioned SQLite schema of a history file, with indexes for the query filters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ensemble.errors import RunDirError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE publications (
    id INTEGER PRIMARY KEY, model INTEGER NOT NULL, step INTEGER NOT NULL,
    epoch INTEGER NOT NULL, loss REAL, grad_norm REAL, t REAL NOT NULL,
    probe1 REAL, probe2 REAL, entropy REAL, sparsity REAL,
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
CREATE INDEX instructions_partner ON instructions (partner, round);
CREATE INDEX instructions_layer ON instructions (layer, round);
CREATE INDEX instructions_step ON instructions (step);
CREATE TABLE generations (
    model INTEGER NOT NULL, generation INTEGER NOT NULL, round INTEGER,
    step INTEGER NOT NULL, path TEXT, t REAL NOT NULL,
    PRIMARY KEY (model, generation));
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


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a file of another schema version, or one that is not a history at all."""
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
