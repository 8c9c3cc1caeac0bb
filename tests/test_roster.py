"""The coordinator's parts alone: its roster of members, its mail, its recorder."""

import math

import numpy as np

from ensemble.coordination.compat import TetherBank
from ensemble.coordination.dispatch import Dispatch
from ensemble.coordination.recording import Recorder, spread
from ensemble.coordination.roster import Roster
from ensemble.history import HistoryReader, HistoryWriter
from ensemble.history.records import CoordinatorState
from ensemble.protocol import Instruction, Rejection


def test_a_fresh_roster_knows_no_one_and_everyone_trains():
    r = Roster(3)
    assert not r.known.any() and r.active.all() and not r.quarantined.any()
    assert r.generation.tolist() == [-1, -1, -1] and r.step.tolist() == [0, 0, 0]
    assert np.isnan(r.loss).all() and r.members() == [0, 1, 2]
    assert r.eligible().size == 0  # no one has published


def test_a_roster_rebuilt_from_a_history_state():
    state = CoordinatorState(
        generation={0: 2, 2: 0},
        step={0: 40, 1: 30},
        epoch={0: 3},
        loss={1: 0.5},
        finished={1, 2},
        failed={2},
    )
    r = Roster(3, state)
    assert r.known.tolist() == [True, False, True]
    assert r.active.tolist() == [True, False, False]
    assert r.step.tolist() == [40, 30, 0] and r.epoch.tolist() == [3, 0, 0]
    assert r.loss[1] == 0.5 and math.isnan(r.loss[0])
    assert r.members() == [0, 1]
    assert r.finish(1, 50) is None  # a resumed job finishing it again: recorded already
    assert r.step[1] == 50


def test_the_frontier_is_the_slowest_model_still_training():
    r = Roster(4)
    r.heard(np.array([0, 1]), 5)
    r.heard(np.array([2, 3]), 3)
    r.heard(np.array([2]), 1)  # an older report never moves it back
    assert r.frontier() == 3
    r.finish(2, 3)
    r.finish(3, 3)
    assert r.frontier() == 5
    r.finish(0, 5)
    r.finish(1, 5)
    assert r.frontier() == math.inf


def test_a_model_ends_once_and_a_failure_after_a_finish_is_still_recorded():
    r = Roster(3)
    assert r.finish(0, 10) == "finished"
    assert r.finish(0, 12) is None and r.step[0] == 12
    assert r.finish(1, 4, failed=True) == "failed"
    assert r.finish(1, 4, failed=True) is None
    assert r.finish(0, 12, failed=True) == "failed"  # finished, then failed for good
    assert not r.active[:2].any() and r.active[2]
    assert r.members() == [2]


def test_quarantine_rejoin_and_who_a_round_may_include():
    r = Roster(4)
    r.known[:] = True
    r.has_features[[0, 1, 2]] = True
    assert r.quarantine(1) and not r.quarantine(1)  # only the first is news
    r.finish(3, 7)
    assert r.eligible().tolist() == [0, 2]
    r.rejoin(1, 20)
    r.rejoin(3, 20)
    assert r.eligible().tolist() == [0, 1, 2, 3] and r.step[1] == 20
    assert r.eligible(need_features=True).tolist() == [0, 1, 2]


def test_the_job_ends_when_every_model_still_training_finished_at_the_boundary():
    r = Roster(3)
    r.finish(2, 5)
    r.finishing[0] = 9
    assert not r.ending()
    r.finishing[1] = 9
    assert r.ending()


def test_reports_move_the_live_models_and_generations_count_up():
    r = Roster(3)
    r.advanced(np.array([0, 1]), np.array([0]), 8, 2, np.array([0.25, 0.75]))
    assert r.step.tolist() == [8, 0, 0] and r.epoch.tolist() == [2, 0, 0]
    assert r.loss[:2].tolist() == [0.25, 0.75]
    assert r.next_generation([0, 2]) == [0, 0]
    assert r.next_generation([0]) == [1]
    rows = r.rows()
    assert [x["step"] for x in rows] == [8, 0, 0] and all(x["idle_seconds"] >= 0 for x in rows)


def merge(model, partner, target):
    return Instruction("merge", model, (partner,), "fc1", 0.5, 0.9, "rule", partner_tether=target)


def test_mail_is_what_the_bank_holds_beyond_the_workers_tethers():
    bank = TetherBank(2, {"fc1": (2, 3)})
    mail = Dispatch(bank, 2, (0.0, 10.0))
    roster = Roster(2)
    roster.known[0] = True
    ones = np.ones((2, 3), np.float32)
    mail.send([merge(0, 1, ones * 3)], [ones * 2], round_id=4, steps=np.array([11, 0]))
    np.testing.assert_array_equal(bank.row(0, "fc1"), 2)
    (ins,) = mail.mailbox[0]
    assert ins.round == 4 and ins.step == 11
    # a report of its old tethers: the bank keeps them with the mail applied on top
    mail.bank_reported(0, {"fc1": ones})
    np.testing.assert_array_equal(bank.row(0, "fc1"), 2)
    reply = mail.take([0, 1], roster)
    assert reply.instructions == (ins,) and reply.unknown == (1,)
    assert mail.mailbox == {0: [], 1: []}
    mail.bank_reported(0, {"fc1": ones * 5})
    np.testing.assert_array_equal(bank.row(0, "fc1"), 5)  # nothing pending now
    mail.resync(0, known=True)
    (sync,) = mail.mailbox[0]
    assert sync.kind == "sync" and (sync.partner_tether == 5).all()
    mail.resync(1, known=False)
    assert mail.mailbox[1] == []


def test_the_recorder_writes_and_counts(tmp_path):
    path = tmp_path / "history.sqlite"
    rec = Recorder(HistoryWriter(path, "j", ""), CoordinatorState(rounds=2, merges=3))
    roster = Roster(2)
    bank = TetherBank(2, {"fc1": (2, 3)})
    with rec.history.tx():
        rec.generations(roster, bank, [0, 1], None)
        rec.rejected_merges(Rejection(0, 5, (merge(0, 1, None),), 0.1, 0.2, {}))
        rec.ended("finished", 1, 9, {}, job_over=False)
    rec.counted([merge(0, 1, None), merge(1, 0, None)], [], [[0, 1]])
    p = rec.progress(roster)
    assert (p["rounds"], p["merges"], p["rejected"], p["merges_kept"]) == (3, 5, 1, 4)
    assert p["groups"] == [[0, 1]] and p["staleness"] is None and p["peak_rss_mb"] > 0
    assert len(p["models"]) == 2
    rec.history.close()
    h = HistoryReader(path)
    assert h.count("generations") == 2 and roster.generation.tolist() == [0, 0]
    (rej,) = h.events("rejected")
    assert rej.model == 0 and rej.detail["partner"] == 1
    assert [e.model for e in h.events("finished")] == [1]
    h.close()


def test_staleness_spread():
    assert spread([]) is None
    assert spread([1, 3, 2]) == {"applied": 3, "mean": 2.0, "max": 3}
