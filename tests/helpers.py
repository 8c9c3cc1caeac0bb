"""Building blocks for tests that drive trainers and a coordinator in one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensemble.coordination.coordinator import Coordinator
from ensemble.history import HistoryReader, HistoryWriter
from ensemble.protocol import Instruction, StackReport
from ensemble.runtime.job import Prepared, make_trainer, prepare
from ensemble.training.trainer import Trainer


def with_(cfg, **sections):
    """cfg with section fields replaced: with_(cfg, train={"epochs": 1})."""
    tree = cfg.model_dump(mode="json")
    for k, v in sections.items():  # a new policy name: a new policy, its own settings
        tree[k] = dict(v) if k == "policy" and "name" in v else {**tree[k], **v}
    return type(cfg).model_validate(tree)


THRESHOLDS = {"name": "threshold", "merge_above": 0.8, "drift_below": 0.2}  # a round's policy


def record(kind, model, partner, layer, c, step, epoch=0, merges=0, rate=None, rule=None):
    """One instruction of a hand-built round, as HistoryWriter.round takes it."""
    rate = rate if rate is not None else 0.5 if kind == "merge" else 0.1
    ins = Instruction(kind, model, (partner,), layer, rate, c, rule or f"rule {kind}")
    return (ins, step, epoch, merges)


def trainer(prep: Prepared, ids, **kw) -> Trainer:
    return make_trainer(prep, list(ids), **kw)


def coordinator(prep: Prepared, run_dir: Path, restore: bool = False, **kw) -> Coordinator:
    """A coordinator writing run_dir/history.sqlite (restore: from what it already holds)."""
    path = Path(run_dir) / "history.sqlite"
    writer = HistoryWriter(path, prep.cfg.job, "", retention=prep.cfg.history.generations)
    state = HistoryReader(path).coordinator_state(prep.cfg.models.count) if restore else None
    kw.setdefault("val_labels", prep.data.y_val)
    return Coordinator(prep.cfg, prep.shapes, writer, state, prep.peers, **kw)


def publish(t: Trainer) -> StackReport:
    """A report in which every live model of the stack publishes its tethers."""
    t.outbox.published[:] = ~t.failed
    return t.report()


def tethers_of(t: Trainer, i: int) -> dict[str, np.ndarray]:
    return {n: v[i].cpu().numpy().copy() for n, v in t.stack.tethers.items()}


def assert_bank_matches(coord: Coordinator, trainers: list[Trainer]) -> None:
    """Every instruction sent was applied: the bank equals each model's tethers, bit for bit."""
    for t in trainers:
        for i, m in enumerate(t.ids):
            if t.failed[i]:
                continue
            for layer, arr in tethers_of(t, i).items():
                np.testing.assert_array_equal(coord.bank.row(m, layer), arr)


__all__ = ["prepare"]
