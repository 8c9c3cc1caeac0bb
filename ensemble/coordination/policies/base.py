"""What every policy is and sees: the round it decides on, its settings, the base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from ensemble.config import Section
from ensemble.coordination.targets import Pool
from ensemble.protocol import Instruction

DEFAULT = "gravity"  # what policy.name auto means


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


class NoPolicy(Policy):
    """Coordination off: models train independently (the baseline for every comparison)."""

    name = "none"
    Settings = NoSettings
    coordinates = False

    def decide(self, r):
        return Decided([])
