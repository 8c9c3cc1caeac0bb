"""Pair policies: the seed's threshold rule (greedy matching of compatible pairs, drift
below a floor) and the seed sketch's every-pair rule."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ensemble.coordination import targets
from ensemble.coordination.compat import SAME_TOL
from ensemble.coordination.policies.base import Decided, LayerView, Policy, Round, Settings, Sharing
from ensemble.protocol import Instruction, Kind

REPULSIVE = "repulsive: rbf kernel"


def _pair(kind: Kind, i: int, j: int, layer: str, rate: float, c: float, rule: str):
    """Both partners receive the instruction, each naming the other."""
    return [
        Instruction(kind, i, (j,), layer, rate, c, rule),
        Instruction(kind, j, (i,), layer, rate, c, rule),
    ]


def mean_offdiag(compat: np.ndarray) -> np.ndarray:
    """Each model's mean compatibility with the others (float64 sums)."""
    k = len(compat)
    return (compat.sum(axis=1, dtype=np.float64) - np.diag(compat)) / max(k - 1, 1)


class _Budget:
    """Per-epoch caps: counts (kind, model) already spent, plus what this round adds."""

    def __init__(self, counts: dict[tuple[str, int], int], caps: dict[str, int]):
        self.counts = dict(counts)
        self.caps = caps

    def allows(self, kind: str, i: int, j: int) -> bool:
        cap = self.caps[kind]
        return self.counts.get((kind, i), 0) < cap and self.counts.get((kind, j), 0) < cap

    def open(self, kind: str, models: np.ndarray) -> np.ndarray:
        """(k,) bool: which of `models` may still take an instruction of `kind`."""
        cap = self.caps[kind]
        return np.array([self.counts.get((kind, int(m)), 0) < cap for m in models], dtype=bool)

    def spend(self, kind: str, i: int, j: int) -> None:
        for m in {i, j}:
            self.counts[(kind, m)] = self.counts.get((kind, m), 0) + 1


class ThresholdSettings(Sharing):
    merge_above: float = 1.0  # merge when compat > merge_above
    drift_below: float = -1.0  # drift when compat < drift_below
    alpha: float = Field(0.5, gt=0, le=1)  # merge rate; 0.5 is the seed's plain average
    eta: float = Field(0.1, gt=0, le=1)  # drift rate, T_i += eta * (T_i - T_j)
    max_merges_per_epoch: int = Field(5, ge=0)  # per model, the seed's cap
    max_drifts_per_epoch: int = Field(5, ge=0)  # per model; drift feeds on itself otherwise
    # pairwise: drift apart from the least compatible partner; repulsive: every model drifts
    # along the RBF-kernel repulsion from all others (SVGD), median-heuristic bandwidth
    drift: Literal["pairwise", "repulsive"] = "repulsive"
    align: bool = True  # pairs from independent inits: match their units first
    guard: bool = True  # keep a merge only if the member's validation loss is no worse

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdSettings:
        if self.drift_below > self.merge_above:
            raise ValueError(
                f"drift_below ({self.drift_below}) must be <= merge_above ({self.merge_above})"
            )
        return self


class ThresholdPolicy(Policy):
    """Merge above `merge_above`, drift below `drift_below`, nothing in between.

    Per layer, each model takes at most one partner: greedy matching, most compatible pairs
    first for merges, then least compatible first for drifts. Both respect per-epoch caps.
    Pairs whose tethers are already identical are not merged again.
    With drift "repulsive", the drift pass is replaced: every model not merged on the layer
    drifts along the RBF-kernel repulsion from all the others (its group: all of them).

    The matching is array work (`greedy_matching`), never a Python loop over the M^2/2
    pairs; only the instructions it gives are built one by one.
    """

    name = "threshold"
    Settings = ThresholdSettings

    def __init__(self, settings, population):
        super().__init__(settings, population)
        self.aligned: dict[tuple[int, int], list[np.ndarray]] = {}  # warm starts per pair

    def decide(self, r: Round) -> Decided:
        return Decided(targets.pairs(self.choose(r.views, r.counts), r, self.s, self.aligned))

    def choose(self, layers: dict[str, LayerView], counts) -> list[Instruction]:
        """The instructions, without their targets."""
        p = self.s
        budget = _Budget(counts, {"merge": p.max_merges_per_epoch, "drift": p.max_drifts_per_epoch})
        out: list[Instruction] = []
        for layer, v in layers.items():
            k = len(v.models)
            free = np.ones(k, dtype=bool)  # not matched on this layer yet
            passes = [("merge", p.alpha)] + ([("drift", p.eta)] if p.drift == "pairwise" else [])
            for kind, rate in passes:
                ok = free & budget.open(kind, v.models)
                if kind == "merge":
                    passing = (v.compat > p.merge_above) & (v.sq_dist > SAME_TOL)
                else:
                    passing = v.compat < p.drift_below
                passing &= ok[:, None] & ok[None, :]
                pairs = greedy_matching(v.compat, passing, highest=kind == "merge")
                sign, bound = (">", "merge_above") if kind == "merge" else ("<", "drift_below")
                for a, b in pairs:
                    i, j, c = int(v.models[a]), int(v.models[b]), float(v.compat[a, b])
                    free[a] = free[b] = False
                    budget.spend(kind, i, j)
                    out += _pair(kind, i, j, layer, rate, c, f"compat {c:.4g} {sign} {bound}")
            if p.drift == "repulsive":
                out += self.repulse(layer, v, free, budget)
        return out

    def repulse(self, layer: str, v: LayerView, free: np.ndarray, budget: _Budget):
        """One repulsive drift per model not merged on this layer, away from every other
        model of the view; compat is its mean compatibility with them."""
        out = []
        means = mean_offdiag(v.compat)
        everyone = v.models.tolist()
        for a in np.flatnonzero(free).tolist():
            i = int(v.models[a])
            if not budget.allows("drift", i, i):
                continue
            budget.spend("drift", i, i)
            others = tuple(m for m in everyone if m != i)
            c = float(means[a])
            out.append(Instruction("drift", i, others, layer, self.s.eta, c, REPULSIVE, whole=True))
        return out


def greedy_matching(
    score: np.ndarray, allowed: np.ndarray, highest: bool = False
) -> list[tuple[int, int]]:
    """The greedy matching over the allowed pairs of a symmetric (k, k) score, lowest score
    first (highest first if `highest`), ties in (row, column) order; pairs in the order
    greedy takes them.

    Greedy in a total order of the pairs equals repeatedly taking every locally dominant
    pair, one that is the best left for both its models (Preis 1999), and that is array
    work. Within a row the order's ties fall to the lower column, which is what argmax
    returns first, so each pass is one argmax over the masked scores: keep the mutual
    bests, strike their rows and columns. Passes are few on real compatibilities (a
    handful at M = 4,096); no sort of the M^2/2 pairs.
    """
    w = np.where(allowed, score if highest else -score, -np.inf)  # score's own dtype
    np.fill_diagonal(w, -np.inf)
    rows = np.arange(len(w))
    taken_a, taken_b = [], []
    while True:
        best = w.argmax(axis=1)
        mutual = (w[rows, best] > -np.inf) & (best[best] == rows) & (rows < best)
        if not mutual.any():
            break
        a, b = rows[mutual], best[mutual]
        taken_a.append(a)
        taken_b.append(b)
        for x in (a, b):
            w[x, :] = -np.inf
            w[:, x] = -np.inf
    if not taken_a:
        return []
    a, b = np.concatenate(taken_a), np.concatenate(taken_b)
    key = score[a, b] if not highest else -score[a, b]
    o = np.lexsort((b, a, key))  # greedy's order: by score, ties by (row, column)
    return list(zip(a[o].tolist(), b[o].tolist(), strict=True))


class SeedSettings(Settings):
    merge_above: float = 1.0  # the seed's COMPATIBILITY_THRESHOLD, on compat.fn's scale
    max_merges_per_epoch: int = Field(5, ge=0)  # the seed's MAX_TETHER_MERGES_PER_EPOCH


class SeedPolicy(Policy):
    """The DTNN seed's rule: average the tethers (rate 0.5) when compat > threshold, capped
    per epoch. No drift and no check that the tethers differ, exactly as the seed; partners
    are taken in index order, one per model per layer."""

    name = "seed"
    Settings = SeedSettings

    def decide(self, r: Round) -> Decided:
        chosen = self.choose(r.views, r.counts)
        return Decided(targets.pairs(chosen, r, Sharing(share="tethers"), {}))

    def choose(self, layers: dict[str, LayerView], counts) -> list[Instruction]:
        """The instructions, without their targets."""
        budget = _Budget(counts, {"merge": self.s.max_merges_per_epoch})
        out: list[Instruction] = []
        for layer, v in layers.items():
            matched: set[int] = set()
            k = len(v.models)
            for a in range(k):
                for b in range(a + 1, k):
                    i, j, c = int(v.models[a]), int(v.models[b]), float(v.compat[a, b])
                    if i in matched or j in matched or c <= self.s.merge_above:
                        continue
                    if not budget.allows("merge", i, j):
                        continue
                    matched |= {i, j}
                    budget.spend("merge", i, j)
                    out += _pair("merge", i, j, layer, 0.5, c, f"seed: compat {c:.4g} > threshold")
        return out
