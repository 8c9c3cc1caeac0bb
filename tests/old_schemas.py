"""The history schemas earlier releases wrote, as they shipped: readers must still read them."""

# version 2 (tether-ensemble before schema 3): a group target was partner -1
V2_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE publications (
    id INTEGER PRIMARY KEY, model INTEGER NOT NULL, step INTEGER NOT NULL,
    epoch INTEGER NOT NULL, loss REAL, grad_norm REAL, t REAL NOT NULL,
    probe1 REAL, probe2 REAL, entropy REAL, sparsity REAL,
    UNIQUE (model, step));
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY, t REAL NOT NULL, models TEXT NOT NULL, instructions INTEGER NOT NULL);
CREATE TABLE compat (
    round INTEGER NOT NULL, layer TEXT NOT NULL, models BLOB NOT NULL, upper BLOB NOT NULL,
    PRIMARY KEY (round, layer));
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
