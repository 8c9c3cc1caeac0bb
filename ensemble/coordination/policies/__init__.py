"""Merge/drift policies: each owns its settings, computes its own targets, keeps its state.

A policy is a small class with no I/O (Flower's strategies, mergekit's merge methods):
- `Settings`: its own frozen pydantic model, every key with its default and a reason. The
  config stores `policy: {name: ..., <settings>}` as given; `resolve` validates them
  against the policy named, so a key the policy does not take is an error naming the
  policy and the keys it does take. `suggests`: what the policy means for other sections
  unless the user says otherwise (FedAvg is a shared init, for instance).
- `decide(round)`: per-layer compatibility among the round's members (and what they
  published) in, instructions out, each carrying its target (ensemble.coordination.targets).
- `state()` / `restore()`: what it keeps between rounds (FedAvgM's momentum, the groups
  it sees), saved in the history with every round, so a restarted coordinator or a
  resumed job carries on where it was.

The coordinator records and dispatches what a policy returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, model_validator

from ensemble.config import Section
from ensemble.coordination import galaxies, targets
from ensemble.coordination.compat import SAME_TOL
from ensemble.coordination.targets import Pool
from ensemble.errors import ConfigError
from ensemble.protocol import Instruction, Kind

DEFAULT = "gravity"  # what policy.name auto means
REPULSIVE = "repulsive: rbf kernel"


# ---------------------------------------------------------------- what a policy sees
@dataclass(frozen=True)
class LayerView:
    """What a policy sees of one layer: compat and squared distance among `models`."""

    models: np.ndarray  # (k,) model ids, row/col order of the matrices
    compat: np.ndarray  # (k, k)
    sq_dist: np.ndarray  # (k, k)


@dataclass(frozen=True)
class Population:
    """What a policy knows of the job from the start."""

    count: int  # trained models; ids from `count` on are fixed peers
    layers: list[str]  # every tethered layer, in forward order
    true_groups: list[list[int]] | None = None  # the data's groups, when it defines them
    tether_range: tuple[float, float] = (0.0, 2.0)


@dataclass(frozen=True)
class Round:
    """One round's input: the members taking part, compatibility per coordinated layer
    (`views`, empty for a policy that computes its own), how many instructions of each kind
    each member has had this epoch, and what the coordinator holds of each member."""

    models: np.ndarray  # (k,) trained models taking part
    views: dict[str, LayerView]
    counts: dict[tuple[str, int], int]
    pool: Pool
    layers: list[str]  # the coordinated layers
    step: int = 0  # the round's step (the least of its members')


@dataclass
class Decided:
    """A round's output: instructions with their targets; the compatibility it decided on
    to record (None: the round's views); the groups it sees (None: the connected
    components of its merges)."""

    instructions: list[Instruction]
    compat: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    groups: list[list[int]] | None = None
    records: list[Instruction] = field(default_factory=list)  # recorded, never sent (cuts)


# ---------------------------------------------------------------- settings
class Settings(Section):
    """Keys every coordinating policy takes (a config section's rules: unknown keys
    refused, every float finite, no boolean as a number)."""

    layers: list[str] | None = None  # layers to coordinate; None: every tethered layer


class Sharing(Settings):
    """A policy whose merges move weights as well as tethers."""

    # what a merge averages: tethers, the tethers only; weights, the trained weights W and
    # biases, each model keeping its own tether (its personal adaptation); both, the
    # tethers and the tethered weights W*T, so the merged layers compute alike
    share: Literal["tethers", "weights", "both"] = "both"
    align: bool = False  # match hidden units (weight matching) before averaging
    guard: bool = False  # keep a merge only if the member's own validation loss is no worse


class NoSettings(Section):
    """A policy that takes no keys."""


class Policy:
    """Base: `decide` maps a round to instructions with their targets."""

    name: ClassVar[str] = "base"
    Settings: ClassVar[type[BaseModel]] = Settings
    suggests: ClassVar[dict[str, dict[str, Any]]] = {}  # other sections' defaults
    coordinates: ClassVar[bool] = True  # False: no rounds at all
    uses_compat: ClassVar[bool] = True  # the round's views, from compat.fn
    uses_outputs: ClassVar[bool] = False  # members' probabilities on the probe batch

    def __init__(self, settings: BaseModel, population: Population):
        self.s = settings
        self.population = population

    def decide(self, r: Round) -> Decided:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """What the policy keeps between rounds, as named arrays (saved in the history)."""
        return {}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Carry on from `state()` as a history saved it."""

    @classmethod
    def traits(cls, s: BaseModel) -> dict[str, bool]:
        """What the trainer must do for it: guard merges; publish the trained weights, the
        probe-batch Grams compat.fn cka needs, or the probe-batch probabilities."""
        share = getattr(s, "share", "tethers")
        return {
            "guard": bool(getattr(s, "guard", False)),
            "weights": bool(getattr(s, "align", False)) or share != "tethers",
            "compat": cls.uses_compat,
            "outputs": cls.uses_outputs,
        }


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


# ---------------------------------------------------------------- pairs
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


# ---------------------------------------------------------------- toward groups
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


class GravitySettings(Sharing):
    # galaxies (who may share): function-space clusters of the members. A population parts
    # only when its clusters' silhouette clears `split` (else it stays one galaxy), and
    # only into a partition `confirm` rounds in a row find; rounds up to step `settle`
    # look again, later ones keep what was found (0: look every round): once attention
    # has personalised the members, their functions differ for that reason alone
    split: float = Field(0.65, gt=-1, lt=1)
    confirm: int = Field(2, ge=1)
    settle: int = Field(120, ge=0)
    # within a galaxy (how much): softmax(sigma * mean update cosine) over its members, a
    # member counted at its best mate's compatibility; sigma_last on the last layer
    sigma: float = Field(3.0, ge=0)
    sigma_last: float = Field(10.0, ge=0)
    # how far a round moves a member to its target; rate_last on the last layer
    rate: float = Field(1.0, gt=0, le=1)
    rate_last: float = Field(0.75, gt=0, le=1)
    # a push of the tethers away from the other galaxies' mean each round; 0: none (cut
    # pairs only stop sharing: pushes hurt in the prototype)
    eta: float = Field(0.0, ge=0, le=1)


class GravityPolicy(Policy):
    """Gravity: compatibility decides who merges and who drifts.

    Each round, the members' class probabilities on the shared probe batch give function-
    space distances, and their clusters the **galaxies** (ensemble.coordination.galaxies): members whose
    functions differ clearly (other label maps, inputs seen otherwise) part, a population
    whose functions do not split clearly stays one galaxy. After `settle` rounds the
    galaxies are fixed. Within its galaxy each member merges, per layer, toward the
    attention-weighted mean of its galaxy-mates, the weights from the cosine of their weight
    updates since the last round, averaged over rounds: one instruction naming the galaxy
    and the weights. A pair that shared and now lies in different galaxies has its edge
    cut: a **drift**, recorded on the function-space "layer" with their compatibility;
    from then on they share nothing, and diverge by themselves (with `eta` > 0 the tethers
    are also pushed apart). Shared init: members start as one."""

    name = "gravity"
    Settings = GravitySettings
    suggests = {
        "model": {"init": "shared"},
        "trigger": {"name": "every_k_steps", "k": 40, "cooldown_steps": 0},
    }
    uses_compat = False
    uses_outputs = True
    SPACE = "function space"  # the compat row of the galaxies (no module name has a space)

    def __init__(self, settings, population):
        super().__init__(settings, population)
        m = population.count
        self.ref: dict[int, dict[str, np.ndarray]] = {}  # each member's weights as last sent
        # per layer: the running sums of the members' update cosines (M, M), and how many
        # rounds each member's were measured (M,); a pair's mean divides by the fewer
        self.csum = {n: np.zeros((m, m), np.float32) for n in population.layers}
        self.seen = {n: np.zeros(m, np.int64) for n in population.layers}
        self.galaxy = np.zeros(m, np.int64)  # the galaxies of the last round: all one at first
        self.settled = False  # past step `settle`: the galaxies are fixed
        self.pending = np.zeros(0, np.int64)  # the last round's partition, to be confirmed
        self.streak = 0  # rounds in a row that found it

    def decide(self, r: Round) -> Decided:
        group = [m for m in r.models.tolist() if m in r.pool.params and m in r.pool.outputs]
        if len(group) < 2:
            return Decided([], compat={})
        ids = np.asarray(group)
        x = {n: targets.flat_weights(r.pool, group, [n], self.s.share) for n in r.layers}
        cbar = {n: self.learn(n, group, x[n]) for n in r.layers}
        dist = galaxies.function_distance(np.stack([r.pool.outputs[m] for m in group]))
        labels, sil = self.find(ids, dist, r.step)
        out, records = [], self.cuts(ids, labels, dist, sil)
        found = [ids[labels == g].tolist() for g in np.unique(labels)]
        last = r.layers[-1]
        for members in found:
            at = np.searchsorted(ids, members)
            for n in r.layers:
                sigma, a = (
                    (self.s.sigma_last, self.s.rate_last)
                    if n == last
                    else (self.s.sigma, self.s.rate)
                )
                c = _block(cbar[n], ids[at])
                mix = galaxies.attention(c, sigma)
                mix *= a
                mix[np.diag_indices(len(at))] += 1 - a  # keep 1 - a of itself
                rule = f"gravity: galaxy of {len(at)}, attention sigma {sigma:g}, rate {a:g}"
                if len(at) > 1:
                    given, sent = targets.mixed(r.pool, members, n, mix, self.s, rule, c)
                    out += given
                    self.remember(members, n, sent)  # what each will hold: its target
                else:
                    self.remember(members, n, x[n][at])
            if self.s.eta and len(found) > 1:
                out += self.push(r, members, group)
        compat = {n: (ids, cbar[n].astype(np.float32)) for n in r.layers}
        compat[self.SPACE] = (ids, (1.0 - dist).astype(np.float32))
        return Decided(out, compat=compat, groups=found, records=records)

    def learn(self, layer: str, group: list[int], x: np.ndarray) -> np.ndarray:
        """Add this round's update cosines to the running sums; -> (k, k) their means."""
        ids = np.asarray(group)
        have = [i for i, m in enumerate(group) if layer in self.ref.get(m, {})]
        if len(have) >= 2:
            before = np.stack([self.ref[group[i]][layer] for i in have])
            _add(self.csum[layer], ids[have], galaxies.update_cosine(x[have], before))
            self.seen[layer][ids[have]] += 1
        n = self.seen[layer][ids]
        return _block(self.csum[layer], ids) / np.maximum(np.minimum.outer(n, n), 1)

    def find(self, ids: np.ndarray, dist: np.ndarray, step: int) -> tuple[np.ndarray, float]:
        """This round's galaxies: the last ones, unless a partition found `confirm` rounds in
        a row replaces them; after step `settle`, the last ones for good."""
        kept = _relabelled(self.galaxy[ids])
        if self.settled:
            return kept, float("nan")
        labels, sil = galaxies.galaxies(dist, self.s.split)
        same = len(self.pending) == len(ids) and (self.pending == labels).all()
        self.streak = self.streak + 1 if same else 1
        self.pending = labels
        if self.s.settle and step >= self.s.settle:
            self.settled = True
        return (labels if self.streak >= self.s.confirm else kept), sil

    def cuts(self, ids, labels, dist, sil) -> list[Instruction]:
        """Pairs that shared (the last round's galaxies) and no longer do: a drift each
        side, recorded (not sent: a cut edge moves nothing), on the function-space row."""
        before = self.galaxy[ids]
        together = before[:, None] == before[None, :]
        apart = labels[:, None] != labels[None, :]
        self.galaxy[ids] = labels
        out = []
        why = f"cut: galaxies part (silhouette {sil:.3g} > split {self.s.split:g})"
        for a, b in zip(*np.nonzero(np.triu(together & apart, 1)), strict=True):
            c = float(1.0 - dist[a, b])
            i, j = int(ids[a]), int(ids[b])
            rate = self.s.eta
            out += [
                Instruction("drift", i, (j,), self.SPACE, rate, c, why),
                Instruction("drift", j, (i,), self.SPACE, rate, c, why),
            ]
        return out

    def remember(self, members: list[int], layer: str, targets_: np.ndarray) -> None:
        """Each member's weights once it applies this round's mail: where its next update
        is measured from."""
        for m, t in zip(members, targets_, strict=True):
            self.ref.setdefault(m, {})[layer] = t

    def push(self, r: Round, members: list[int], group: list[int]) -> list[Instruction]:
        """eta > 0: each member's tethers pushed away from the other galaxies' mean."""
        others = [m for m in group if m not in set(members)]
        out = []
        for n in r.layers:
            away = np.mean([r.pool.tether(m, n) for m in others], 0)
            for m in members:
                out.append(
                    Instruction(
                        "drift",
                        m,
                        tuple(others),
                        n,
                        self.s.eta,
                        float("nan"),
                        "gravity: away from the other galaxies",
                        whole=True,
                        partner_tether=away,
                    )
                )
        return out

    def state(self):
        """The galaxies, and per layer the mean update cosines (their upper triangle, as
        float16: 32 MB a layer at M = 4,096) and each member's count of rounds."""
        out = {
            "galaxy": self.galaxy.copy(),
            "pending": self.pending.copy(),
            "settled": np.array([self.settled, self.streak]),
        }
        up = np.triu_indices(len(self.galaxy), 1)
        for n, csum in self.csum.items():
            seen = self.seen[n]
            out[f"mean/{n}"] = (
                csum[up] / np.maximum(np.minimum(seen[up[0]], seen[up[1]]), 1)
            ).astype(np.float16)
            out[f"seen/{n}"] = seen.copy()
        return out

    def restore(self, state):
        if "galaxy" not in state:
            return
        self.galaxy = state["galaxy"].astype(np.int64)
        self.settled, self.streak = bool(state["settled"][0]), int(state["settled"][1])
        self.pending = state["pending"].astype(np.int64)
        up = np.triu_indices(len(self.galaxy), 1)
        for n in self.csum:
            if f"mean/{n}" in state:
                seen = state[f"seen/{n}"].astype(np.int64)
                csum = np.zeros_like(self.csum[n])
                csum[up] = state[f"mean/{n}"] * np.minimum(seen[up[0]], seen[up[1]])
                self.csum[n] = csum + csum.T
                self.seen[n] = seen


def _everyone(x: np.ndarray, ids: np.ndarray) -> bool:
    return len(ids) == len(x) and bool((ids == np.arange(len(x))).all())


def _block(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """x's rows and columns `ids`: x itself when they are all of them in order (no M^2
    copy at thousands of members), else a copy."""
    return x if _everyone(x, ids) else x[np.ix_(ids, ids)]


def _add(x: np.ndarray, ids: np.ndarray, v: np.ndarray) -> None:
    """x's block of rows and columns `ids` += v, in place."""
    if _everyone(x, ids):
        x += v
    else:
        x[np.ix_(ids, ids)] += v


def _relabelled(labels: np.ndarray) -> np.ndarray:
    """Labels 0..G-1 in order of first member."""
    _, first = np.unique(labels, return_index=True)
    order = {labels[i]: g for g, i in enumerate(sorted(first))}
    return np.array([order[x] for x in labels], dtype=np.int64)


class NoPolicy(Policy):
    """Coordination off: models train independently (the baseline for every comparison)."""

    name = "none"
    Settings = NoSettings
    coordinates = False

    def decide(self, r):
        return Decided([])


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        GravityPolicy,
        ThresholdPolicy,
        FedAvgPolicy,
        MeanPolicy,
        FedAMPPolicy,
        SeedPolicy,
        NoPolicy,
    )
}


# ---------------------------------------------------------------- config resolution
def policy_class(name: str) -> type[Policy]:
    name = DEFAULT if name == "auto" else name
    if name not in POLICIES:
        raise ConfigError(
            f"policy.name: unknown name {name!r}; choose one of {sorted([*POLICIES, 'auto'])}"
        )
    return POLICIES[name]


def settings_of(policy_cfg) -> BaseModel:
    """The settings of the policy a config's `policy` section names, validated by that
    policy's own model: an unknown key names the policy and the keys it takes."""
    cls = policy_class(policy_cfg.name)
    given = dict(policy_cfg.model_extra or {})
    try:
        return cls.Settings.model_validate(given)
    except ValidationError as e:
        takes = sorted(cls.Settings.model_fields)
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                parts.append(
                    f"policy.{loc}: policy {cls.name!r} takes no key {loc!r}; it takes "
                    f"{takes or 'no keys'}"
                )
            else:
                where = f"policy.{loc}: " if loc else f"policy ({cls.name}): "
                value = f" (got {err['input']!r})" if loc else ""
                parts.append(f"{where}{err['msg'].removeprefix('Value error, ')}{value}")
        raise ConfigError("; ".join(parts)) from None


def resolve(cfg):
    """The config with its policy made explicit: `auto` named, every setting of the policy
    filled in with its default, and what the policy suggests for other sections applied
    where the user gave nothing (so config.yaml says exactly what ran)."""
    cls = policy_class(cfg.policy.name)
    s = settings_of(cfg.policy)
    tree = cfg.model_dump(mode="json")
    tree["policy"] = {"name": cls.name, **s.model_dump(mode="json")}
    for section, keys in cls.suggests.items():
        given = getattr(cfg, section).model_fields_set
        tree[section] |= {k: v for k, v in keys.items() if k not in given}
    return type(cfg).model_validate(tree)


def make_policy(cfg, population: Population) -> Policy:
    cls = policy_class(cfg.policy.name)
    return cls(settings_of(cfg.policy), population)


def traits(cfg) -> dict[str, bool]:
    """What the trainer must do for the job's policy: coordinates, guard, weights."""
    cls = policy_class(cfg.policy.name)
    return {"coordinates": cls.coordinates, **cls.traits(settings_of(cfg.policy))}


__all__ = [
    "DEFAULT",
    "POLICIES",
    "Decided",
    "LayerView",
    "Policy",
    "Population",
    "Round",
    "make_policy",
    "resolve",
    "settings_of",
    "traits",
]
