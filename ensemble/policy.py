"""Merge/drift policies: pure functions of compatibility matrices and per-model state.

A policy sees, per layer, the compatibility among the eligible models and returns
instructions. It does no I/O; the coordinator records and dispatches what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ensemble.compat import SAME_TOL
from ensemble.protocol import ENSEMBLE, Instruction, Kind


@dataclass(frozen=True)
class LayerView:
    """What a policy sees of one layer: compat and squared distance among `models`."""

    models: np.ndarray  # (k,) model ids, row/col order of the matrices
    compat: np.ndarray  # (k, k)
    sq_dist: np.ndarray  # (k, k)


@dataclass(frozen=True)
class PolicyParams:
    merge_above: float
    drift_below: float
    alpha: float
    eta: float
    max_merges_per_epoch: int
    max_drifts_per_epoch: int
    drift: str = "pairwise"  # or "repulsive"


class Policy:
    """Base: `decide` maps per-layer views and per-epoch counts to instructions."""

    name = "base"
    coordinates = True  # False: the coordinator skips compatibility entirely

    def __init__(self, params: PolicyParams):
        self.p = params

    def decide(
        self, layers: dict[str, LayerView], counts: dict[tuple[str, int], int]
    ) -> list[Instruction]:
        """counts: (kind, model) -> instructions of that kind already this epoch.

        Must not mutate its inputs."""
        raise NotImplementedError


def _pair(kind: Kind, i: int, j: int, layer: str, rate: float, c: float, rule: str):
    """Both partners receive the instruction, each naming the other."""
    return [
        Instruction(kind, i, j, layer, rate, c, rule),
        Instruction(kind, j, i, layer, rate, c, rule),
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
        for m in (i, j):
            self.counts[(kind, m)] = self.counts.get((kind, m), 0) + 1


class ThresholdPolicy(Policy):
    """Merge above `merge_above`, drift below `drift_below`, nothing in between.

    Per layer, each model takes at most one partner: greedy matching, most compatible pairs
    first for merges, then least compatible first for drifts. Both respect per-epoch caps.
    Pairs whose tethers are already identical are not merged again.
    With drift "repulsive", the drift pass is replaced: every model not merged on the layer
    drifts along the RBF-kernel repulsion from all the others (partner ENSEMBLE).

    The matching is array work (`greedy_matching`), never a Python loop over the M^2/2
    pairs; only the instructions it gives are built one by one.
    """

    name = "threshold"

    def decide(self, layers, counts):
        p = self.p
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
        """One repulsive drift per model not merged on this layer; compat is its mean
        compatibility with the others. The coordinator computes the force from the bank."""
        out = []
        means = mean_offdiag(v.compat)
        for a in np.flatnonzero(free).tolist():
            i = int(v.models[a])
            if not budget.allows("drift", i, i):
                continue
            budget.counts[("drift", i)] = budget.counts.get(("drift", i), 0) + 1
            c = float(means[a])
            out.append(
                Instruction("drift", i, ENSEMBLE, layer, self.p.eta, c, "repulsive: rbf kernel")
            )
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


class SeedPolicy(Policy):
    """The DTNN seed's rule: average (alpha 0.5) when compat > threshold, capped per epoch.

    No drift and no check that the tethers differ, exactly as the seed; partners are taken in
    index order, one per model per layer.
    """

    name = "seed"

    def decide(self, layers, counts):
        budget = _Budget(counts, {"merge": self.p.max_merges_per_epoch})
        out: list[Instruction] = []
        for layer, v in layers.items():
            matched: set[int] = set()
            k = len(v.models)
            for a in range(k):
                for b in range(a + 1, k):
                    i, j, c = int(v.models[a]), int(v.models[b]), float(v.compat[a, b])
                    if i in matched or j in matched or c <= self.p.merge_above:
                        continue
                    if not budget.allows("merge", i, j):
                        continue
                    matched |= {i, j}
                    budget.spend("merge", i, j)
                    out += _pair("merge", i, j, layer, 0.5, c, f"seed: compat {c:.4g} > threshold")
        return out


class PopulationPolicy(Policy):
    """Every round, every model merges toward the population's mean on every coordinated
    layer, at `rate` (with alignment, each model's units matched to one reference first).
    Federated averaging is the case rate = 1. No pairs, so no per-epoch caps, and no drift;
    `compat` records the model's mean compatibility with the others."""

    rate = 1.0
    rule = "population mean"

    def decide(self, layers, counts):
        out = []
        for layer, v in layers.items():
            means = mean_offdiag(v.compat)
            for m, c in zip(v.models.tolist(), means.tolist(), strict=True):
                out.append(Instruction("merge", m, ENSEMBLE, layer, self.rate, c, self.rule))
        return out


class FedAvgPolicy(PopulationPolicy):
    """Federated averaging: every round, each layer of every model <- the population mean."""

    name = "fedavg"
    rule = "fedavg: the population mean"


class MeanPolicy(PopulationPolicy):
    """A soft pull: each model moves `policy.alpha` of the way to the population mean."""

    name = "mean"

    def __init__(self, params: PolicyParams):
        super().__init__(params)
        self.rate = params.alpha
        self.rule = f"mean: rate {params.alpha:g} toward the population mean"


class NoPolicy(Policy):
    """Coordination off: models train independently (the baseline for every comparison)."""

    name = "none"
    coordinates = False

    def decide(self, layers, counts):
        return []


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (ThresholdPolicy, FedAvgPolicy, MeanPolicy, SeedPolicy, NoPolicy)
}


def make_policy(name: str, params: PolicyParams) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](params)
