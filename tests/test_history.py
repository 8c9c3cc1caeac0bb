"""The history file: schema, version checks, records."""

import sqlite3

import numpy as np
import pytest

from ensemble.errors import RunDirError
from ensemble.history import SCHEMA_VERSION, HistoryReader, HistoryWriter
from tests.helpers import THRESHOLDS, record


def test_writer_initialises_a_file_a_reader_created_empty(tmp_path):
    path = tmp_path / "history.sqlite"
    sqlite3.connect(path).close()  # e.g. a reader that opened it before the writer
    w = HistoryWriter(path, "j", "job: j\n")
    w.publication(0, 1, 0, 2.3, 0.5)
    w.close()
    assert HistoryReader(path).count("publications") == 1


def test_publications_are_idempotent_per_model_and_step(tmp_path):
    w = HistoryWriter(tmp_path / "h.sqlite", "j", "")
    for _ in range(3):
        w.publication(0, 5, 0, 1.0, 1.0)
    w.publication(1, 5, 0, 1.0, 1.0)
    assert HistoryReader(tmp_path / "h.sqlite").count("publications") == 2


def test_round_records_compat_and_pairs(tmp_path):
    w = HistoryWriter(tmp_path / "h.sqlite", "j", "")
    rows = [
        record("merge", 0, 2, "fc1", 0.9, 10, 1, 1, rule="r"),
        record("merge", 2, 0, "fc1", 0.9, 12, 1, 1, rule="r"),
    ]
    rid = w.round(
        [0, 1, 2],
        {"fc1": ([0, 1, 2], [[1, 0.3, 0.9], [0.3, 1, 0.4], [0.9, 0.4, 1]])},
        rows,
        THRESHOLDS,
    )
    h = HistoryReader(tmp_path / "h.sqlite")
    (d,) = h.decisions()
    assert (d.round, d.kind, d.model, d.partner, d.compat, d.step) == (rid, "merge", 0, 2, 0.9, 10)
    assert h.count("compat") == 1 and h.count("instructions") == 2  # one row per layer
    ids, mat = h.compat_matrix(rid, "fc1")
    assert ids == [0, 1, 2] and mat[0, 2] == mat[2, 0] == pytest.approx(0.9)
    assert np.isnan(mat[1, 1]) and mat[1, 2] == pytest.approx(0.4)
    assert h.explain(d.id).compat_row == pytest.approx({1: 0.3, 2: 0.9})
    assert h.decisions("drift") == []


def test_other_schema_version_is_refused_clearly(tmp_path):
    path = tmp_path / "h.sqlite"
    HistoryWriter(path, "j", "").close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(
        RunDirError, match=f"schema version {SCHEMA_VERSION + 1}.*reads version 1 or 2 or 3"
    ):
        HistoryReader(path)
    with pytest.raises(RunDirError, match="schema version"):
        HistoryWriter(path, "j", "")


def test_foreign_sqlite_file_is_not_a_history(tmp_path):
    path = tmp_path / "h.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(RunDirError, match="not a tether-ensemble history"):
        HistoryReader(path)


def test_one_writer_per_history(tmp_path):
    from ensemble.errors import EnsembleError

    path = tmp_path / "history.sqlite"
    first = HistoryWriter(path, "j", "")
    with pytest.raises(EnsembleError, match="another coordinator is writing this history"):
        HistoryWriter(path, "j", "", lock_timeout=0.3)
    first.close()  # the lock goes with its holder
    HistoryWriter(path, "j", "").close()


def test_version_1_histories_are_still_read(tmp_path):
    """Version 1 kept compat as one row per pair; the reader answers the same from it, and a
    writer refuses to append to it rather than mix two layouts."""
    from tests.old_schemas import V2_SCHEMA

    v1 = V2_SCHEMA.replace(
        "round INTEGER NOT NULL, layer TEXT NOT NULL, models BLOB NOT NULL, upper BLOB NOT NULL,"
        "\n    PRIMARY KEY (round, layer));",
        "round INTEGER NOT NULL, layer TEXT NOT NULL, i INTEGER NOT NULL, j INTEGER NOT NULL,"
        "\n    value REAL NOT NULL, PRIMARY KEY (round, layer, i, j));",
    )
    assert v1 != V2_SCHEMA
    path = tmp_path / "history.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(v1)
        conn.execute("PRAGMA user_version=1")
        conn.execute("INSERT INTO meta VALUES ('job', 'old')")
        conn.execute("INSERT INTO rounds VALUES (1, 0.0, '[0, 1, 2]', 2)")
        conn.executemany(
            "INSERT INTO compat VALUES (1, 'fc1', ?, ?, ?)", [(0, 1, 0.3), (0, 2, 0.9), (1, 2, 0.4)]
        )
        conn.execute(
            "INSERT INTO instructions (round, kind, model, partner, layer, rate, compat, rule,"
            " merge_above, drift_below, step, epoch, merges_in_epoch, t)"
            " VALUES (1, 'merge', 0, 2, 'fc1', 0.5, 0.9, 'r', 0.8, 0.2, 10, 0, 1, 0.0)"
        )
    conn.close()
    h = HistoryReader(path)
    ids, mat = h.compat_matrix(1, "fc1")
    assert ids == [0, 1, 2] and mat[0, 2] == 0.9 and mat[2, 1] == 0.4 and np.isnan(mat[0, 0])
    (d,) = h.decisions()
    assert h.explain(d.id).compat_row == {1: 0.3, 2: 0.9}
    assert h.layers() == ["fc1"]
    with pytest.raises(RunDirError, match="schema version 1.*writes version 3"):
        HistoryWriter(path, "old", "")


def test_version_2_group_targets_read_as_the_rounds_members(tmp_path):
    """Version 2 wrote a merge toward the population's mean (FedAvg) and a repulsive drift
    as partner -1; the reader names their groups: the round's members (for the drift, the
    others), so lineage, --explain and the plots name them too."""
    from tests.old_schemas import V2_SCHEMA

    path = tmp_path / "history.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(V2_SCHEMA)
        conn.execute("PRAGMA user_version=2")
        conn.execute("INSERT INTO meta VALUES ('job', 'old')")
        conn.execute("INSERT INTO rounds VALUES (1, 0.0, '[0, 1, 2]', 6)")
        conn.executemany(
            "INSERT INTO instructions (round, kind, model, partner, layer, rate, compat, rule,"
            " merge_above, drift_below, step, epoch, merges_in_epoch, t)"
            " VALUES (1, ?, ?, -1, 'fc1', 1.0, 0.5, 'r', 1.0, -1.0, 10, 0, 1, 0.0)",
            [("merge", 0), ("merge", 1), ("drift", 2)],
        )
    conn.close()
    h = HistoryReader(path)
    merges, drifts = h.merges(), h.drifts()
    assert [(d.model, d.partner, d.group) for d in merges] == [
        (0, None, (0, 1, 2)),
        (1, None, (0, 1, 2)),
    ]
    assert [(d.model, d.group) for d in drifts] == [(2, (0, 1))]
    assert {(e.model, e.partner) for e in h.lineage(0).edges} == {(0, 1), (0, 2)}
    assert h.explain(merges[0].id).decision.group == (0, 1, 2)


def test_a_group_target_is_stored_once_a_round_and_read_back_by_its_members(tmp_path):
    from ensemble.protocol import Instruction

    w = HistoryWriter(tmp_path / "history.sqlite", "j", "")
    group = (0, 1, 2, 3)
    rows = [
        (Instruction("merge", m, group, layer, 1.0, float("nan"), "fedavg"), 5, 0, 1)
        for m in group
        for layer in ("fc1", "out")
    ]
    weighted = Instruction("merge", 0, (0, 2), "fc1", 1.0, 0.3, "w", weights=(0.25, 0.75))
    rid = w.round(list(group), {}, [*rows, (weighted, 5, 0, 2)], {"name": "fedavg"}, [list(group)])
    w.close()
    h = HistoryReader(tmp_path / "history.sqlite")
    assert h.count("instructions") == 9
    sets = h.conn.execute("SELECT COUNT(*) FROM member_sets WHERE round = ?", (rid,)).fetchone()
    assert sets == (2,)  # the population once, the weighted pair once: not once per instruction
    got = h.decisions(pairs=False)
    assert all(d.group == group and d.partner is None for d in got[:8])
    assert np.isnan(got[0].compat) and got[0].merge_above is None
    assert (got[8].group, got[8].weights) == ((0, 2), (0.25, 0.75))
    assert h.round_groups() == [(rid, [list(group)])]
    assert "group of 4: 0, 1, 2, 3" in got[0].target()


def test_history_compat_keeps_the_matrices_of_chosen_rounds_only(tmp_path):
    """history.compat every:K keeps rounds that are multiples of K and the first; a round
    without its matrices still has its decisions, and --explain says what was not kept."""
    from typer.testing import CliRunner

    from ensemble.cli import app
    from ensemble.config import HistoryConfig

    assert HistoryConfig().compat_every(512) == 1 and HistoryConfig().compat_every(4096) == 10
    assert HistoryConfig(compat="none").compat_every(8) == 0
    with pytest.raises(ValueError, match="'last:2': expected 'auto', 'all', 'every:K'"):
        HistoryConfig(compat="last:2")
    w = HistoryWriter(tmp_path / "history.sqlite", "j", "", compat_every=3)
    c = {"fc1": ([0, 1], np.array([[1, 0.9], [0.9, 1]]))}
    for r in range(1, 7):
        w.round([0, 1], c, [record("merge", 0, 1, "fc1", 0.9, r, 0, 1, rule="r")], THRESHOLDS)
    w.close()
    h = HistoryReader(tmp_path / "history.sqlite")
    kept = [r for r in range(1, 7) if h.compat_matrix(r, "fc1")[0]]
    assert kept == [1, 3, 6] and len(h.decisions()) == 6
    out = CliRunner().invoke(app, ["history", str(tmp_path), "--explain", "2"])
    assert out.exit_code == 0, out.output
    assert "round 2's compatibility matrices were not kept (history.compat)" in out.output
    assert "0.9000" in out.output
