"""Merge/drift policies: pure functions of compatibility matrices and per-model state.

A policy sees, per layer, the compatibility among the eligible models and returns
instructions. It does no I/O; the coordinator records and dispatches what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Kind = Literal["merge", "drift"]
SAME_TOL = 1e-10  # squared distance below which two tethers are already one


@dataclass(frozen=True)
class Instruction:
    """Coordinator -> worker: change `model`'s tether of `layer` relative to `partner`'s.

    merge: T <- (1 - rate) T + rate T_partner.   drift: T <- clip(T + rate (T - T_partner)).
    `partner_tether` is the partner's tether at decision time, so the worker needs nothing else.
    """

    kind: Kind
    model: int
    partner: int
    layer: str
    rate: float
    compat: float
    rule: str
    partner_tether: np.ndarray | None = field(default=None, compare=False, repr=False)


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


class Policy:
    """Base: `decide` maps per-layer views and merge counts to instructions."""

    name = "base"
    coordinates = True  # False: the coordinator skips compatibility entirely

    def __init__(self, params: PolicyParams):
        self.p = params

    def decide(self, layers: dict[str, LayerView], merges: dict[int, int]) -> list[Instruction]:
        """merges: model -> merges already made this epoch. Must not mutate its inputs."""
        raise NotImplementedError


def _pair(kind: Kind, i: int, j: int, layer: str, rate: float, c: float, rule: str):
    """Both partners receive the instruction, each naming the other."""
    return [Instruction(kind, i, j, layer, rate, c, rule), Instruction(kind, j, i, layer, rate, c, rule)]


class ThresholdPolicy(Policy):
    """Merge above `merge_above`, drift below `drift_below`, nothing in between.

    Per layer, each model takes at most one partner: greedy matching, most compatible pairs
    first for merges, least compatible first for drifts. Merges respect the per-epoch cap.
    Pairs whose tethers are already identical are not merged again.
    """

    name = "threshold"

    def decide(self, layers, merges):
        p = self.p
        counts = dict(merges)
        out: list[Instruction] = []
        for layer, v in layers.items():
            k = len(v.models)
            iu, ju = np.triu_indices(k, k=1)
            vals = v.compat[iu, ju]
            matched: set[int] = set()
            for idx in np.argsort(-vals, kind="stable"):
                a, b, c = int(iu[idx]), int(ju[idx]), float(vals[idx])
                if c <= p.merge_above:
                    break
                i, j = int(v.models[a]), int(v.models[b])
                if i in matched or j in matched or v.sq_dist[a, b] <= SAME_TOL:
                    continue
                if max(counts.get(i, 0), counts.get(j, 0)) >= p.max_merges_per_epoch:
                    continue
                matched |= {i, j}
                counts[i] = counts.get(i, 0) + 1
                counts[j] = counts.get(j, 0) + 1
                out += _pair("merge", i, j, layer, p.alpha, c, f"compat {c:.4g} > merge_above")
            for idx in np.argsort(vals, kind="stable"):
                a, b, c = int(iu[idx]), int(ju[idx]), float(vals[idx])
                if c >= p.drift_below:
                    break
                i, j = int(v.models[a]), int(v.models[b])
                if i in matched or j in matched:
                    continue
                matched |= {i, j}
                out += _pair("drift", i, j, layer, p.eta, c, f"compat {c:.4g} < drift_below")
        return out


class SeedPolicy(Policy):
    """The DTNN seed's rule: average (alpha 0.5) when compat > threshold, capped per epoch.

    No drift and no check that the tethers differ, exactly as the seed; partners are taken in
    index order, one per model per layer.
    """

    name = "seed"

    def decide(self, layers, merges):
        p = self.p
        counts = dict(merges)
        out: list[Instruction] = []
        for layer, v in layers.items():
            matched: set[int] = set()
            k = len(v.models)
            for a in range(k):
                for b in range(a + 1, k):
                    i, j, c = int(v.models[a]), int(v.models[b]), float(v.compat[a, b])
                    if i in matched or j in matched or c <= p.merge_above:
                        continue
                    if max(counts.get(i, 0), counts.get(j, 0)) >= p.max_merges_per_epoch:
                        continue
                    matched |= {i, j}
                    counts[i] = counts.get(i, 0) + 1
                    counts[j] = counts.get(j, 0) + 1
                    out += _pair("merge", i, j, layer, 0.5, c, f"seed: compat {c:.4g} > threshold")
        return out


class NoPolicy(Policy):
    """Coordination off: models train independently (the baseline for every comparison)."""

    name = "none"
    coordinates = False

    def decide(self, layers, merges):
        return []


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (ThresholdPolicy, SeedPolicy, NoPolicy)
}


def make_policy(name: str, params: PolicyParams) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](params)
