"""Surge–collapse training dynamics (the surge-collapse seed), driven by activation entropy.

Collapse prunes each weight matrix W below the `sparsity` quantile of |W|; surge refills the
zeros with noise * recovery_rate. Both act on W; tethers act on W ⊙ T and are untouched.

Modes:
- fixed: the seed's schedule, collapse every `collapse_every` steps, surge every `surge_every`;
- entropy: each step, measure the histogram entropy of every hidden layer's activations on
  the batch (normalised to [0, 1]) and act on the mean:
    high (> high_entropy)  -> collapse, plus energy injection (noise on surviving weights);
    low (< low_entropy)    -> controlled noise on the inputs for the next `noise_steps` steps;
    plateau (over the last `plateau_window` steps, the mean of the second half differs from
    the first half's by less than `plateau_tol`) -> collapse.
  After any action the mode waits `cooldown` steps.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ensemble.config import DynamicsConfig


def collapse_(w: torch.Tensor, sparsity: float) -> float:
    """Zero the entries of w below the `sparsity` quantile of |w|, in place; the seed's
    `param[param.abs() < threshold] = 0`. Returns the fraction now zero."""
    k = int(round(sparsity * w.numel()))
    if k > 0:
        flat = w.detach().abs().reshape(-1)
        idx = torch.topk(flat, k, largest=False).indices  # exactly k smallest, ties broken
        w.data.view(-1)[idx] = 0.0
    return int((w == 0).sum()) / w.numel()


def surge_(w: torch.Tensor, recovery_rate: float, gen: torch.Generator) -> int:
    """Refill exact zeros with N(0, 1) * recovery_rate, in place. Returns how many."""
    mask = w == 0
    n = int(mask.sum())
    if n:
        w.data[mask] = (torch.randn(n, generator=gen) * recovery_rate).to(w.device)
    return n


def energy_(w: torch.Tensor, scale: float, gen: torch.Generator) -> None:
    """Energy injection: noise of `scale` * std(w) on the surviving (non-zero) weights."""
    mask = w != 0
    if mask.any():
        std = float(w[mask].std()) if int(mask.sum()) > 1 else 1.0
        w.data[mask] += (torch.randn(int(mask.sum()), generator=gen) * scale * std).to(w.device)


def activation_entropy(h: torch.Tensor, bins: int) -> float:
    """Histogram entropy of activations, normalised by log(bins) to [0, 1]."""
    h = h.detach().float().reshape(-1)
    lo, hi = float(h.min()), float(h.max())
    if hi <= lo:
        return 0.0
    counts = torch.histc(h, bins=bins, min=lo, max=hi)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum()) / math.log(bins)


@dataclass
class Action:
    """What the dynamics did at a step, to record as an event."""

    kind: str  # collapse | surge | energy | input_noise
    step: int
    detail: dict = field(default_factory=dict)


class SurgeCollapse:
    def __init__(self, cfg: DynamicsConfig, seed: int):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed + 104_729)
        self.history: deque[float] = deque(maxlen=cfg.plateau_window)
        self.last_action = -(10**9)
        self.noise_until = -1

    def decide(self, step: int, entropies: list[float]) -> list[str]:
        """Which actions to take at `step`: a pure function of the step and entropies."""
        c = self.cfg
        if c.mode == "fixed":
            out = []
            if step % c.collapse_every == 0:
                out.append("collapse")
            if step % c.surge_every == 0:
                out.append("surge")
            return out
        mean = sum(entropies) / len(entropies) if entropies else 0.0
        self.history.append(mean)
        if step - self.last_action < c.cooldown:
            return []
        full = len(self.history) == self.history.maxlen
        if mean > c.high_entropy:
            return ["collapse", "energy"]
        if mean < c.low_entropy:
            return ["input_noise"]
        if full and abs(self._drift()) < c.plateau_tol:
            return ["collapse"]
        return []

    def _drift(self) -> float:
        """Mean of the window's second half minus its first: robust to per-batch noise."""
        w = list(self.history)
        half = len(w) // 2
        return sum(w[half:]) / (len(w) - half) - sum(w[:half]) / half

    def input_noise(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """Controlled noise on the inputs while a low-entropy episode lasts."""
        if step <= self.noise_until:
            return x + (torch.randn(x.shape, generator=self.gen) * self.cfg.input_noise).to(
                x.device
            )
        return x

    def act(
        self, step: int, weights: dict[str, torch.Tensor], entropies: list[float]
    ) -> list[Action]:
        """Decide and apply; returns the actions taken, with what triggered them."""
        kinds = self.decide(step, entropies)
        if not kinds:
            return []
        self.last_action = step
        why = {"entropy": [round(e, 5) for e in entropies], "mode": self.cfg.mode}
        out = []
        with torch.no_grad():
            for kind in kinds:
                detail = dict(why)
                if kind == "collapse":
                    detail["sparsity"] = {
                        n: collapse_(w, self.cfg.sparsity) for n, w in weights.items()
                    }
                elif kind == "surge":
                    detail["refilled"] = {
                        n: surge_(w, self.cfg.recovery_rate, self.gen) for n, w in weights.items()
                    }
                elif kind == "energy":
                    for w in weights.values():
                        energy_(w, self.cfg.energy, self.gen)
                elif kind == "input_noise":
                    self.noise_until = step + self.cfg.noise_steps
                    detail["until_step"] = self.noise_until
                out.append(Action(kind, step, detail))
        return out
