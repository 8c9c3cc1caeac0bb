"""The coordinator and trainers in one process (no Ray): decisions, bank and history agree."""

import numpy as np

from ensemble.coordinator import Coordinator, TetherReport
from ensemble.data import load_dataset
from ensemble.history import HistoryReader
from ensemble.training import DirectLink, Trainer, interleave, model_sizes


def shapes_for(cfg, data):
    sizes = model_sizes(cfg, data)
    from ensemble.model import layer_names

    names = layer_names(len(sizes) - 1)
    return {n: (o, i) for n, i, o in zip(names, sizes[:-1], sizes[1:], strict=True)}


def test_interleaved_job_records_decisions_and_bank_matches_workers(tiny_cfg, tmp_path):
    data = load_dataset(tiny_cfg.data, tiny_cfg.seed)
    coord = Coordinator(tiny_cfg, tiny_cfg.job, shapes_for(tiny_cfg, data), str(tmp_path))
    trainers = [Trainer(m, tiny_cfg, data) for m in range(4)]
    results = interleave(trainers, DirectLink(coord))
    coord.close()

    # Every instruction a worker was sent was applied, so the coordinator's bank equals
    # each worker's actual tethers, bit for bit.
    for t in trainers:
        for layer, arr in t.model.export_tethers().items():
            np.testing.assert_array_equal(coord.bank.row(t.id, layer), arr)
    assert [r.steps for r in results] == [t.step for t in trainers]

    h = HistoryReader(tmp_path / "history.sqlite")
    decisions = h.decisions()
    assert {d.kind for d in decisions} == {"merge", "drift"}
    for d in decisions:  # each decision's compat value justifies it
        if d.kind == "merge":
            assert d.compat > d.merge_above
        else:
            assert d.compat < d.drift_below
    assert coord.merges == sum(d.kind == "merge" for d in decisions)
    assert h.count("publications") == coord.publications > 0
    assert len(h.events("finished")) == 4
    assert {(m.model, m.split) for m in h.metrics()} == {
        (m, s) for m in range(4) for s in ("train", "val")
    }
    applied = sum(t.applied for t in trainers)
    assert applied == h.count("instructions")


def test_none_policy_records_publications_but_no_rounds(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(
        update={"policy": tiny_cfg.policy.model_copy(update={"name": "none"})}
    )
    data = load_dataset(cfg.data, cfg.seed)
    coord = Coordinator(cfg, cfg.job, shapes_for(cfg, data), str(tmp_path))
    interleave([Trainer(m, cfg, data) for m in range(4)], DirectLink(coord))
    h = HistoryReader(tmp_path / "history.sqlite")
    assert h.count("publications") > 0 and h.count("rounds") == 0 and coord.merges == 0


def test_stale_publication_does_not_overwrite_pending_decision(tiny_cfg, tmp_path):
    """A report sent before its sender received a merge must not undo that merge in the bank."""
    shapes = {"fc1": (2, 3)}
    cfg = tiny_cfg.model_copy(
        update={
            "models": tiny_cfg.models.model_copy(update={"count": 2}),
            "policy": tiny_cfg.policy.model_copy(update={"merge_above": 0.5, "drift_below": 0.0}),
            "compat": tiny_cfg.compat.model_copy(update={"normalize": "none"}),
        }
    )
    coord = Coordinator(cfg, cfg.job, shapes, str(tmp_path))
    a = np.full((2, 3), 1.0, dtype=np.float32)
    b = np.full((2, 3), 2.0, dtype=np.float32)
    coord.publish(TetherReport(0, 1, 0, 1.0, 1.0, {"fc1": a}))
    got = coord.publish(TetherReport(1, 1, 0, 1.0, 1.0, {"fc1": b}))  # round: merge 0 & 1
    assert [i.kind for i in got] == ["merge"]
    np.testing.assert_allclose(coord.bank.row(0, "fc1"), 1.5)
    # model 0 publishes its old tethers before it polled its mailbox
    mail = coord.publish(TetherReport(0, 2, 0, 1.0, 1.0, {"fc1": a}))
    np.testing.assert_allclose(coord.bank.row(0, "fc1"), 1.5)
    assert [i.kind for i in mail] == ["merge"] and mail[0].partner == 1
