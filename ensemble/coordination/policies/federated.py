"""Policies toward group means: FedAvg (and FedAvgM), the plain mean, FedAMP."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ensemble.coordination import targets
from ensemble.coordination.policies.base import Decided, Policy, Round, Sharing
from ensemble.protocol import Instruction


class FedAvgSettings(Sharing):
    # server momentum (FedAvgM, Hsu et al. 2019): the round's target is the mean plus
    # momentum times the target's last move; 0 is plain federated averaging
    momentum: float = Field(0.0, ge=0, lt=1)
    # population: everyone to the population's mean; groups: each member to the mean of its
    # group of the data (data.groups): the oracle, which knows who belongs together
    within: Literal["population", "groups"] = "population"


class FedAvgPolicy(Policy):
    """Federated averaging (McMahan et al. 2017): every round, each coordinated layer of
    every member <- the mean of its group (the whole population, or with `within: groups`
    the data's own groups), with server momentum when `momentum` > 0. From a shared init,
    with no guard and no alignment, unless the settings say otherwise."""

    name = "fedavg"
    Settings = FedAvgSettings
    suggests = {"model": {"init": "shared"}}
    uses_compat = False
    rate = 1.0

    def __init__(self, settings, population):
        super().__init__(settings, population)
        self.server = targets.Momentum(settings.momentum, population.tether_range)

    def groups(self, models: np.ndarray) -> list[list[int]]:
        here = models.tolist()
        if self.s.within == "groups" and self.population.true_groups:
            found = [[m for m in g if m in set(here)] for g in self.population.true_groups]
            return [g for g in found if g]
        return [here]

    def decide(self, r: Round) -> Decided:
        groups = self.groups(r.models)
        out = []
        for k, group in enumerate(groups):
            for layer in r.layers:
                means, order = targets.group_mean(r.pool, group, layer, self.s)
                if len(groups) == 1:  # momentum: the population's target moves on
                    means = self.server.step(layer, group[0], means)
                else:
                    means = self.server.step(f"{layer}@{k}", group[0], means)
                rule = self.rule(len(group))
                for m in group:
                    ins = Instruction(
                        "merge", m, tuple(group), layer, self.rate, float("nan"), rule, whole=True
                    )
                    out.append(targets.toward(ins, means, order, r.pool, self.s))
        return Decided(out, compat={}, groups=groups)

    def rule(self, n: int) -> str:
        what = "its group's" if self.s.within == "groups" else "the population"
        beta = f", momentum {self.s.momentum:g}" if self.s.momentum else ""
        return f"fedavg: the mean of {what} {n} members{beta}"

    def state(self):
        return self.server.state()

    def restore(self, state):
        self.server.restore(state)


class MeanSettings(Sharing):
    alpha: float = Field(0.5, gt=0, le=1)  # how far toward the population's mean a round moves


class MeanPolicy(FedAvgPolicy):
    """A soft pull: each member moves `alpha` of the way to the population's mean."""

    name = "mean"
    Settings = MeanSettings

    def __init__(self, settings, population):
        Policy.__init__(self, settings, population)
        self.server = targets.Momentum(0.0, population.tether_range)
        self.rate = settings.alpha

    def groups(self, models):
        return [models.tolist()]

    def rule(self, n: int) -> str:
        return f"mean: rate {self.s.alpha:g} toward the mean of {n} members"


class FedAMPSettings(Sharing):
    # attention: xi_ij ∝ exp(sigma * cos(w_i, w_j)) over the others j (Huang et al. 2021)
    sigma: float = Field(5.0, gt=0)
    # the member's own share of its personal target u_i = self_weight w_i + (1 -
    # self_weight) sum_j xi_ij w_j (FedAMP's alpha_k); 0.5 keeps half of itself
    self_weight: float = Field(0.5, ge=0, lt=1)


class FedAMPPolicy(Policy):
    """FedAMP (Huang et al., AAAI 2021): each member's target is its own personalised
    cloud model, a similarity-weighted mean of the others' weights, with weights ∝
    exp(sigma * cos) of their (flattened, tethered) weights; the member then moves to it.
    One target per member: a (k, k) attention matrix times the members' weights."""

    name = "fedamp"
    Settings = FedAMPSettings
    suggests = {"model": {"init": "shared"}}
    uses_compat = False

    def decide(self, r: Round) -> Decided:
        group = [m for m in r.models.tolist() if m in r.pool.params]
        if len(group) < 2:
            return Decided([], compat={})
        cos = targets.weight_cosine(r.pool, group, r.layers, self.s.share)  # (k, k)
        logits = self.s.sigma * cos
        np.fill_diagonal(logits, -np.inf)
        xi = np.exp(logits - logits.max(1, keepdims=True))
        xi /= xi.sum(1, keepdims=True)
        mix = (1 - self.s.self_weight) * xi + self.s.self_weight * np.eye(len(group))
        out = []
        for layer in r.layers:
            out += targets.mixed(r.pool, group, layer, mix, self.s, "fedamp", cos)[0]
        ids = np.asarray(group)
        compat = {layer: (ids, cos.astype(np.float32)) for layer in r.layers}
        return Decided(out, compat=compat, groups=[group])
