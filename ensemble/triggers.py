"""When a worker publishes its tethers: the seed's plateau test, or every k steps."""

from __future__ import annotations

import math

from ensemble.config import TriggerConfig


class Trigger:
    """Stateful per-model trigger; `check` is called once per training step."""

    def __init__(self, cfg: TriggerConfig):
        self.cfg = cfg
        self.prev_loss = math.inf
        self.last_fired = -(10**9)

    def condition(self, step: int, loss: float, grad_norm: float) -> bool:
        raise NotImplementedError

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        hit = self.condition(step, loss, grad_norm)
        self.prev_loss = loss
        if hit and step - self.last_fired >= self.cfg.cooldown_steps:
            self.last_fired = step
            return True
        return False


class PlateauTrigger(Trigger):
    """The seed: |loss change| < loss_threshold or gradient norm < grad_threshold."""

    def condition(self, step, loss, grad_norm):
        return (
            abs(self.prev_loss - loss) < self.cfg.loss_threshold
            or grad_norm < self.cfg.grad_threshold
        )


class EveryKTrigger(Trigger):
    def condition(self, step, loss, grad_norm):
        return step > 0 and step % self.cfg.k == 0


TRIGGERS: dict[str, type[Trigger]] = {"plateau": PlateauTrigger, "every_k_steps": EveryKTrigger}


def make_trigger(cfg: TriggerConfig) -> Trigger:
    return TRIGGERS[cfg.name](cfg)
