"""Faults in one process (no Ray): poison, rollback, coordinator recovery, full disk."""

import sqlite3

import numpy as np
import pytest
import torch

from ensemble.coordinator import Coordinator
from ensemble.data import load_dataset
from ensemble.errors import EnsembleError
from ensemble.history import History, HistoryWriter
from ensemble.training import DirectLink, Trainer, interleave
from tests.test_coordinator import shapes_for


class WatchingLink(DirectLink):
    """A DirectLink that keeps every instruction the coordinator hands out."""

    def __init__(self, coordinator):
        super().__init__(coordinator)
        self.delivered = []

    def call(self, method, *args):
        out = super().call(method, *args)
        if method in ("publish", "poll", "finish", "rejoin"):
            self.delivered += out
        return out


class Poisoned(Trainer):
    """Sets its fc1 weights to NaN at one step, as a blown-up model would."""

    def __init__(self, *a, at_step: int, **kw):
        super().__init__(*a, **kw)
        self.at_step = at_step

    def train_step(self, xb, yb):
        if self.step == self.at_step and not getattr(self, "fired", False):
            self.fired = True  # once: a rollback must then cure it
            with torch.no_grad():
                self.model.layers["fc1"].linear.weight.fill_(float("nan"))
        return super().train_step(xb, yb)


def setup(cfg, tmp_path, on_poison, at_step=20):
    cfg = cfg.model_copy(
        update={
            "faults": cfg.faults.model_copy(update={"on_poison": on_poison}),
            "train": cfg.train.model_copy(update={"epochs": 3}),
        }
    )
    data = load_dataset(cfg.data, cfg.seed)
    coord = Coordinator(cfg, cfg.job, shapes_for(cfg, data), str(tmp_path))
    ck = tmp_path / "checkpoints"
    trainers = [Trainer(m, cfg, data, ck) for m in (0, 2, 3)]
    trainers.insert(1, Poisoned(1, cfg, data, ck, at_step=at_step))
    return coord, trainers


@pytest.mark.parametrize("on_poison", ["rollback", "stop"])
def test_nan_model_is_quarantined_and_no_one_receives_a_non_finite_tether(
    tiny_cfg, tmp_path, on_poison
):
    coord, trainers = setup(tiny_cfg, tmp_path, on_poison)
    seen_while_quarantined = []
    decide = coord.policy.decide

    def watched(views, counts):
        if coord.quarantined[1]:
            seen_while_quarantined.extend(set(v.models.tolist()) for v in views.values())
        return decide(views, counts)

    coord.policy.decide = watched
    link = WatchingLink(coord)
    results = interleave(trainers, link)
    h = History.open(tmp_path)

    assert link.delivered, "no instructions at all: the test proves nothing"
    for ins in link.delivered:  # the guarantee
        assert np.isfinite(ins.partner_tether).all(), ins
    for m in range(4):  # and the bank never held one
        for layer in coord.bank.shapes:
            assert np.isfinite(coord.bank.row(m, layer)).all()
    (q,) = h.events(kind="quarantined")
    assert q.model == 1 and "nan" in q.detail["reason"]
    if on_poison == "rollback":
        (rb,) = h.events(kind="rolled_back")
        assert rb.model == 1 and rb.step < 20  # back to the epoch's checkpoint
        assert results[1].failed is False and results[1].steps == results[0].steps
        assert all(np.isfinite(v).all() for v in results[1].weights.values())
    else:
        assert results[1].failed is True
        assert [e.model for e in h.events(kind="failed")] == [1]
        assert not coord.active[1]
    if on_poison == "stop":  # quarantined for good: never in a round, never a partner
        assert seen_while_quarantined, "no round ran while model 1 was quarantined"
        assert all(1 not in models for models in seen_while_quarantined)


def test_bad_publication_is_quarantined_not_banked(tiny_cfg, tmp_path):
    from ensemble.coordinator import TetherReport

    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    shapes = shapes_for(tiny_cfg, data)
    coord = Coordinator(tiny_cfg, tiny_cfg.job, shapes, str(tmp_path))
    bad = {k: np.full(s, np.inf, dtype=np.float32) for k, s in shapes.items()}
    assert coord.publish(TetherReport(2, 5, 0, 1.0, 1.0, bad)) == []
    assert coord.quarantined[2] and not coord.known[2]
    assert np.all(coord.bank.row(2, "fc1") == 0)
    (q,) = History.open(tmp_path).events(kind="quarantined")
    assert "non-finite" in q.detail["reason"]


def test_restarted_coordinator_rebuilds_its_state_from_the_history(tiny_cfg, tmp_path):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    shapes = shapes_for(tiny_cfg, data)
    first = Coordinator(tiny_cfg, tiny_cfg.job, shapes, str(tmp_path))
    trainers = [Trainer(m, tiny_cfg, data) for m in range(4)]
    gens = [t.steps(DirectLink(first)) for t in trainers]
    for _ in range(25):  # part way through the job
        for g in gens:
            next(g)
    assert first.rounds > 0 and first.merges + first.drifts > 0
    first.history.close()  # the actor dies here

    again = Coordinator(tiny_cfg, tiny_cfg.job, shapes, str(tmp_path))
    for attr in ("rounds", "merges", "drifts", "publications"):
        assert getattr(again, attr) == getattr(first, attr), attr
    assert again.per_epoch == first.per_epoch
    assert list(again.known) == list(first.known)
    for m in range(4):
        for layer in shapes:
            np.testing.assert_array_equal(again.bank.row(m, layer), first.bank.row(m, layer))
        # every known model is told to take the coordinator's record of its tethers
        assert [i.kind for i in again.mailbox[m]] == ["sync"] * len(shapes)
    assert [e.kind for e in History.open(tmp_path).events(kind="coordinator_restored")]


def test_full_disk_fails_cleanly_and_keeps_the_database_valid(tmp_path):
    path = tmp_path / "history.sqlite"
    w = HistoryWriter(path, "j", "")
    w.conn.execute("PRAGMA max_page_count = 12")  # a disk with room for a few pages only
    with pytest.raises(EnsembleError, match="history.sqlite: cannot write the history"):
        for step in range(100_000):
            w.publication(0, step, 0, 1.0, 1.0)
    w.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = History.open(tmp_path).count("publications")
    assert kept > 0  # everything committed before the disk filled is still there
