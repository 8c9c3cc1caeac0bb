"""When models publish: the seed's plateau test, or every k steps; k models at once.

The trainer keeps each step's losses and gradient norms on its device and reads them once
per exchange, as a (W, k) window of W steps; `check` runs the per-step rule over the window
in order, so it decides exactly what a per-step check would have.
"""

from __future__ import annotations

import numpy as np

from ensemble.config import TriggerConfig

NEVER = -(10**9)


class Triggers:
    """Per-model trigger state for a stack of k models, as arrays."""

    def __init__(self, cfg: TriggerConfig, k: int):
        if cfg.name not in RULES:
            raise ValueError(f"trigger.name: unknown {cfg.name!r}; choose one of {sorted(RULES)}")
        self.cfg = cfg
        self.rule = RULES[cfg.name]
        self.prev_loss = np.full(k, np.inf)  # (k,) the loss of the step before the window
        self.last_fired = np.full(k, NEVER, dtype=np.int64)  # (k,)

    def check(self, steps: np.ndarray, losses: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """steps (W,), losses and norms (W, k) -> (k,) bool: fired at some step of the window
        (respecting `cooldown_steps` between two firings of one model)."""
        prev = np.vstack([self.prev_loss[None, :], losses[:-1]])  # (W, k)
        hit = self.rule(self.cfg, steps[:, None], prev, losses, norms)  # (W, k)
        fired = np.zeros(losses.shape[1], dtype=bool)
        for w, step in enumerate(steps.tolist()):  # W is small (poll_steps)
            now = hit[w] & (step - self.last_fired >= self.cfg.cooldown_steps)
            self.last_fired[now] = step
            fired |= now
        if len(losses):
            self.prev_loss = losses[-1].copy()
        return fired

    def state(self) -> list[list]:
        return [self.prev_loss.tolist(), self.last_fired.tolist()]

    def load(self, state: list[list]) -> None:
        self.prev_loss = np.array(state[0], dtype=np.float64)
        self.last_fired = np.array(state[1], dtype=np.int64)


def plateau(cfg, steps, prev, loss, norm):
    """The seed: |loss change| < loss_threshold or gradient norm < grad_threshold."""
    with np.errstate(invalid="ignore"):
        return (np.abs(prev - loss) < cfg.loss_threshold) | (norm < cfg.grad_threshold)


def every_k(cfg, steps, prev, loss, norm):
    return np.broadcast_to((steps > 0) & (steps % cfg.k == 0), loss.shape)


RULES = {"plateau": plateau, "every_k_steps": every_k}
