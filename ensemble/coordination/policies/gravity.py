"""Gravity, the default: galaxies of members that compute alike, and within a galaxy each
member pulled toward those whose updates agree with its own (maths: coordination.galaxies)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ensemble.coordination import galaxies, targets
from ensemble.coordination.policies.base import Decided, Policy, Round, Sharing
from ensemble.protocol import Instruction


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
    space distances, and their clusters the **galaxies** (coordination.galaxies): members whose
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
