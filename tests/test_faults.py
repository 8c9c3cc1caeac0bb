"""Faults in one process (no Ray): poison, rollback, coordinator recovery, full disk."""

import sqlite3

import numpy as np
import pytest
import torch

from ensemble.api import History
from ensemble.errors import EnsembleError
from ensemble.history import HistoryWriter
from ensemble.history.writer import HistoryFullError
from ensemble.protocol import EpochReport
from ensemble.runtime.job import drive, failure_reasons, prepare, summarise
from tests.helpers import assert_bank_matches, coordinator, trainer, with_
from tests.test_coordinator import report


def poison_at(t, model: int, step: int) -> None:
    """Make `model` of trainer t blow up once at `step`: its fc1 weights turn NaN."""
    train_step, i = t.train_step, t.row[model]

    def poisoned(**kw):
        if t.step == step:
            with torch.no_grad():
                t.stack.weight("fc1")[i] = float("nan")
        train_step(**kw)

    t.train_step = poisoned


def setup(cfg, tmp_path, on_poison, at_step=20):
    prep = prepare(with_(cfg, faults={"on_poison": on_poison}, train={"epochs": 3}))
    coord = coordinator(prep, tmp_path)
    trainers = [trainer(prep, [m], checkpoint_dir=tmp_path / "checkpoints") for m in range(4)]
    poison_at(trainers[1], 1, at_step)
    delivered = []
    take = coord.take_mail

    def watched_mail(models):  # every instruction the coordinator hands out
        reply = take(models)
        delivered.extend(reply.instructions)
        return reply

    coord.take_mail = watched_mail
    return coord, trainers, delivered


@pytest.mark.parametrize("on_poison", ["rollback", "stop"])
def test_nan_model_is_quarantined_and_no_one_receives_a_non_finite_tether(
    tiny_cfg, tmp_path, on_poison
):
    coord, trainers, delivered = setup(tiny_cfg, tmp_path, on_poison)
    seen_while_quarantined = []
    decide = coord.policy.decide

    def watched(r):
        if coord.quarantined[1]:
            seen_while_quarantined.extend(set(v.models.tolist()) for v in r.views.values())
        return decide(r)

    coord.policy.decide = watched
    drive(trainers, coord)
    results = [r for t in trainers for r in t.results(0.0, 1.0)]
    coord.history.close()
    h = History.open(tmp_path)

    assert delivered, "no instructions at all: the test proves nothing"
    for ins in delivered:  # the guarantee
        assert np.isfinite(ins.partner_tether).all(), ins
    for m in range(4):  # and the bank never held one
        for layer in coord.bank.shapes:
            assert np.isfinite(coord.bank.row(m, layer)).all()
    (q,) = h.events(kind="quarantined")
    assert q.model == 1 and "nan" in q.detail["reason"]
    if on_poison == "rollback":
        (rb,) = h.events(kind="rolled_back")
        assert rb.model == 1 and rb.detail["synced"]  # it took the bank's record of itself
        assert results[1].failed is False and results[1].steps == results[0].steps
        assert all(np.isfinite(v).all() for v in results[1].weights.values())
        assert_bank_matches(coord, trainers)
    else:
        assert results[1].failed is True
        assert [e.model for e in h.events(kind="failed")] == [1]
        assert not coord.active[1]
        assert seen_while_quarantined, "no round ran while model 1 was quarantined"
        assert all(1 not in models for models in seen_while_quarantined)


def test_bad_publication_is_quarantined_not_banked(tiny_cfg, tmp_path):
    prep = prepare(tiny_cfg)
    coord = coordinator(prep, tmp_path)
    bad = {k: np.full((1, *s), np.inf, dtype=np.float32) for k, s in prep.shapes.items()}
    assert coord.exchange(report([2], 5, bad)).instructions == ()
    assert coord.quarantined[2] and not coord.known[2]
    assert np.all(coord.bank.row(2, "fc1") == 0)
    coord.history.close()
    (q,) = History.open(tmp_path).events(kind="quarantined")
    assert "non-finite" in q.detail["reason"]


def test_restarted_coordinator_rebuilds_its_state_from_the_history(tiny_cfg, tmp_path):
    prep = prepare(tiny_cfg)
    first = coordinator(prep, tmp_path)
    t = trainer(prep, range(4))
    t.receive(first.join(t.join_request()))
    for _ in range(3):  # part way through the job
        t.train_window()
        first.receive(t.report())
        if first.round_due():
            first.run_round()
        t.receive(first.take_mail(t.models))
    assert first.rounds > 0 and first.merges + first.drifts > 0
    first.history.close()  # the actor dies here

    again = coordinator(prep, tmp_path, restore=True)
    for attr in ("rounds", "merges", "drifts", "publications"):
        assert getattr(again, attr) == getattr(first, attr), attr
    assert again.per_epoch == first.per_epoch
    assert list(again.known) == list(first.known)
    for m in range(4):
        for layer in prep.shapes:
            np.testing.assert_array_equal(again.bank.row(m, layer), first.bank.row(m, layer))
        # every known model is told to take the coordinator's record of its tethers
        assert [i.kind for i in again.mailbox[m]] == ["sync"] * len(prep.shapes)
    again.history.close()


def test_full_disk_fails_cleanly_and_keeps_the_database_valid(tmp_path):
    path = tmp_path / "history.sqlite"
    w = HistoryWriter(path, "j", "")
    w.conn.execute("PRAGMA max_page_count = 12")  # a disk with room for a few pages only
    with pytest.raises(EnsembleError, match="history.sqlite: cannot write the history"):
        for step in range(100_000):
            w.publications([(0, step, 0, 1.0, 1.0, None, None, None, None)])
    w.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = History.open(tmp_path).count("publications")
    assert kept > 0  # everything committed before the disk filled is still there


def test_a_nan_validation_loss_is_a_quarantine_not_an_sql_error(tiny_cfg, tmp_path):
    prep = prepare(tiny_cfg)
    coord = coordinator(prep, tmp_path)
    n, c = len(prep.data.y_val), prep.data.classes
    probs = np.full((4, n, c), 1.0 / c, np.float32)
    probs[2] = np.nan  # model 2's outputs blew up on the validation split
    val = np.array([[0.5, 0.8], [0.5, 0.8], [np.nan, 0.1], [0.5, 0.8]])
    er = EpochReport(0, np.arange(4), np.full((4, 2), 0.5), val, probs)
    coord.receive(report([0, 1, 2, 3], 5, {}, epoch_report=er))  # used to kill the worker
    coord.history.close()
    h = History.open(tmp_path)
    (q,) = h.events(kind="quarantined")
    assert q.model == 2 and q.detail["reason"] == "val loss is nan"
    assert coord.quarantined[2] and not coord.quarantined[[0, 1, 3]].any()
    assert {m.model for m in h.metrics() if m.model >= 0} == {0, 1, 3}
    (ens,) = h.metrics(model=-1)  # the ensemble of the others, finite
    assert np.isfinite(ens.loss) and ens.accuracy > 0


def test_an_unwritable_generations_directory_is_a_history_error_naming_it(tmp_path):
    (tmp_path / "generations").write_text("not a directory")  # as an immutable dir acts
    w = HistoryWriter(tmp_path / "history.sqlite", "j", "")
    with pytest.raises(HistoryFullError, match="generations/round_000001.safetensors: cannot"):
        w.generation(0, 0, 1, 0, {"fc1": np.ones((2, 2), np.float32)})
    w.close()


def test_a_stopped_members_summary_entry_says_why(tiny_cfg, tmp_path):
    coord, trainers, _ = setup(tiny_cfg, tmp_path, "stop")
    drive(trainers, coord)
    results = [r for t in trainers for r in t.results(0.0, 1.0)]
    coord.history.close()
    summary = summarise(
        prepare(coord.cfg), results, coord.progress(), 1.0, failure_reasons(tmp_path)
    )
    assert summary["failed"] == [{"model": 1, "reason": "quarantined (loss is nan), stopped"}]
    assert [m["model"] for m in summary["members"]] == [0, 2, 3]


def test_a_member_whose_test_predictions_are_not_finite_is_failed_not_scored(tiny_cfg, tmp_path):
    coord, trainers, _ = setup(tiny_cfg, tmp_path, "stop", at_step=10**9)  # none poisoned
    drive(trainers, coord)
    results = [r for t in trainers for r in t.results(0.0, 1.0)]
    results[3].test_probs[:] = np.nan
    summary = summarise(prepare(coord.cfg), results, coord.progress(), 1.0, {})
    coord.history.close()
    (f,) = summary["failed"]
    assert f["model"] == 3 and "not finite" in f["reason"]
    assert np.isfinite(summary["ensemble"]["nll"])
