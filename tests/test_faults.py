"""Faults in one process (no Ray): poison, rollback, coordinator recovery, full disk."""

import sqlite3

import numpy as np
import pytest
import torch

from ensemble.api import History
from ensemble.errors import EnsembleError
from ensemble.history import HistoryWriter
from ensemble.job import drive, prepare
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
