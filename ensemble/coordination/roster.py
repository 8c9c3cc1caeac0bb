"""The coordinator's roster: where each member of the job stands, one array entry a model."""

from __future__ import annotations

import math
import time

import numpy as np

from ensemble.history.records import CoordinatorState


class Roster:
    """Per model (index = model id): its latest tether generation, whether it has published
    (known), is still training (active) or is quarantined, whether its probe-batch features
    are known, its last call, step, epoch, loss, validation accuracy and the latest step it
    reported (the sync barrier). Beside them: the models that failed, those whose end is
    recorded, and those that finished at the boundary being closed."""

    def __init__(self, count: int, state: CoordinatorState | None = None):
        state = state or CoordinatorState()
        m = self.count = count
        self.generation = np.array([state.generation.get(i, -1) for i in range(m)])
        self.known = self.generation >= 0  # has published at least once
        self.active = np.array([i not in state.finished for i in range(m)])  # still training
        self.quarantined = np.zeros(m, dtype=bool)  # non-finite: never a partner
        self.has_features = np.zeros(m, dtype=bool)
        self.contact = np.full(m, time.time())  # last call from each model
        self.step = np.array([state.step.get(i, 0) for i in range(m)])
        self.epoch = np.array([state.epoch.get(i, 0) for i in range(m)])
        self.loss = np.array([state.loss.get(i, math.nan) for i in range(m)])
        self.val_acc = np.full(m, math.nan)
        self.reported = np.full(m, -1)  # latest step each model reported
        self.failed = set(state.failed)
        self.ended = set(state.finished)  # models whose finished/failed event is recorded
        self.failed_recorded = set(state.failed)
        self.finishing: dict[int, int] = {}  # model -> step: finished at this boundary

    def join(self, model: int) -> None:
        """A model's stack (re)starts: it takes part."""
        self.active[model] = True
        self.contact[model] = time.time()

    def heard(self, models: np.ndarray, step: int) -> None:
        """`models` called, having reached `step`."""
        self.contact[models] = time.time()
        self.reported[models] = np.maximum(self.reported[models], step)

    def advanced(self, models: np.ndarray, live: np.ndarray, step: int, epoch: int, losses):
        """A report's models' latest losses; its live ones are at `step` of `epoch`."""
        self.step[live], self.epoch[live] = step, epoch
        self.loss[models] = losses

    def quarantine(self, model: int) -> bool:
        """Quarantine `model`: True when it was not already."""
        new = not self.quarantined[model]
        self.quarantined[model] = True
        return bool(new)

    def rejoin(self, model: int, step: int) -> None:
        """A model restarted, resumed or rolled back to `step`: it takes part again."""
        self.quarantined[model] = False
        self.active[model] = True
        self.step[model] = step

    def finish(self, model: int, step: int, failed: bool = False) -> str | None:
        """The model stops training. The event to record, "finished" or "failed", or None
        when its end is already recorded (a resumed job finishing it again)."""
        self.active[model] = False
        self.step[model] = max(self.step[model], step)
        if failed:
            self.failed.add(model)
        if model in self.ended and not (failed and model not in self.failed_recorded):
            return None
        self.ended.add(model)
        if failed:
            self.failed_recorded.add(model)
        return "failed" if failed else "finished"

    def eligible(self, need_features: bool = False) -> np.ndarray:
        """The ids of the models a round may include: known, active, not quarantined (and
        with features, when compat is computed from them)."""
        ok = self.known & self.active & ~self.quarantined
        if need_features:
            ok &= self.has_features
        return np.flatnonzero(ok)

    def frontier(self) -> float:
        """The step every model still training has reported up to (inf when none is)."""
        live = self.reported[self.active]
        return float(live.min()) if len(live) else math.inf

    def ending(self) -> bool:
        """Every model still training finished at this boundary: the job ends here."""
        return bool(self.finishing) and all(
            self.finishing.get(m) is not None for m in np.flatnonzero(self.active)
        )

    def members(self) -> list[int]:
        """The ensemble's members: every model but the failed."""
        return [m for m in range(self.count) if m not in self.failed]

    def next_generation(self, models: list[int]) -> list[int]:
        """A new tether generation for each of `models`: their numbers."""
        out = []
        for m in models:
            self.generation[m] += 1
            out.append(int(self.generation[m]))
        return out

    def rows(self) -> list[dict]:
        """Each model's standing, for the progress report."""
        now = time.time()
        return [
            {
                "model": m,
                "step": int(self.step[m]),
                "epoch": int(self.epoch[m]),
                "loss": float(self.loss[m]),
                "val_acc": float(self.val_acc[m]),
                "active": bool(self.active[m]),
                "quarantined": bool(self.quarantined[m]),
                "idle_seconds": now - float(self.contact[m]),
            }
            for m in range(self.count)
        ]
