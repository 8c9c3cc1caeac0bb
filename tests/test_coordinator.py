"""The coordinator and trainers in one process (no Ray): decisions, bank and history agree."""

import numpy as np

from ensemble.coordination.coordinator import Coordinator
from ensemble.history import HistoryReader, HistoryWriter
from ensemble.protocol import StackReport
from ensemble.runtime.job import drive, prepare
from tests.helpers import assert_bank_matches, coordinator, trainer, with_


def report(models, step, tethers, **kw):
    """A stack report in which `models` publish `tethers` (layer -> (n, ...))."""
    n = len(models)
    return StackReport(
        models=np.array(models),
        step=step,
        epoch=0,
        losses=np.ones(n),
        grad_norms=np.ones(n),
        published=np.ones(n, dtype=bool),
        introduced=np.ones(n, dtype=bool),
        tethers=tethers,
        **kw,
    )


def test_a_job_records_decisions_and_the_bank_matches_the_workers(tiny_cfg, tmp_path):
    prep = prepare(tiny_cfg)
    coord = coordinator(prep, tmp_path)
    trainers = [trainer(prep, [m]) for m in range(4)]
    drive(trainers, coord)
    coord.history.close()
    assert_bank_matches(coord, trainers)
    h = HistoryReader(tmp_path / "history.sqlite")
    decisions = h.decisions()
    assert {d.kind for d in decisions} == {"merge", "drift"}
    for d in decisions:  # each decision's compat value justifies it
        if d.kind == "merge":
            assert d.compat > d.merge_above
        else:
            assert d.compat < d.drift_below
    instructions = h.decisions(pairs=False)  # counted per instruction, each side of a pair
    assert coord.merges == sum(d.kind == "merge" for d in instructions)
    assert coord.drifts == sum(d.kind == "drift" for d in instructions)
    assert h.count("publications") == coord.publications > 0
    assert len(h.events("finished")) == 4
    # every instruction a worker was sent was applied, once
    assert coord.progress()["staleness"]["applied"] == h.count("instructions")


def test_none_policy_records_publications_but_no_rounds(tiny_cfg, tmp_path):
    prep = prepare(with_(tiny_cfg, policy={"name": "none"}))
    coord = coordinator(prep, tmp_path)
    drive([trainer(prep, range(4))], coord)
    coord.history.close()
    h = HistoryReader(tmp_path / "history.sqlite")
    assert h.count("publications") > 0 and h.count("rounds") == 0 and coord.merges == 0


def test_a_stale_report_does_not_undo_a_pending_decision(tiny_cfg, tmp_path):
    """A report sent before its sender received a merge must not undo that merge in the
    bank: the bank holds the reported tethers with the undelivered mail applied on top."""
    cfg = with_(
        tiny_cfg,
        models={"count": 2},
        policy={"merge_above": 0.5, "drift_below": 0.0},
        compat={"normalize": "none"},
    )
    writer = HistoryWriter(tmp_path / "history.sqlite", cfg.job, "")
    coord = Coordinator(cfg, {"fc1": (2, 3)}, writer)
    a = np.full((1, 2, 3), 1.0, dtype=np.float32)
    b = np.full((1, 2, 3), 2.0, dtype=np.float32)
    coord.exchange(report([0], 1, {"fc1": a}))
    got = coord.exchange(report([1], 1, {"fc1": b}))  # a round: merge 0 & 1
    assert [i.kind for i in got.instructions] == ["merge"]
    np.testing.assert_allclose(coord.bank.row(0, "fc1"), 1.5)
    # model 0 reports its old tethers before it received its mail
    coord.receive(report([0], 2, {"fc1": a}))
    np.testing.assert_allclose(coord.bank.row(0, "fc1"), 1.5)
    mail = coord.take_mail([0]).instructions
    assert [i.kind for i in mail] == ["merge"] and mail[0].partner == 1
    assert mail[0].round == 1 and mail[0].step == 1
