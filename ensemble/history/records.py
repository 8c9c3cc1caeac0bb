"""Typed records read back from a history."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class Record:
    def as_dict(self) -> dict:
        """A plain dict, as JSON gives it back (tuples as lists)."""
        return _listed(asdict(self))  # type: ignore[arg-type]


def _listed(x):
    if isinstance(x, dict):
        return {k: _listed(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_listed(v) for v in x]
    return x


@dataclass(frozen=True, slots=True)
class Decision(Record):
    """One instruction as recorded: `model` received it. Its target is `group`: a pair's
    one `partner`, or several members (partner None) whose mean (weighted by `weights`,
    when recorded) it moved toward, or away from for a drift. The thresholds are the
    round's policy settings (None for a policy without them)."""

    id: int
    round: int
    kind: str
    model: int
    partner: int | None
    layer: str
    rate: float
    compat: float
    rule: str
    merge_above: float | None
    drift_below: float | None
    step: int
    epoch: int
    merges_in_epoch: int
    group: tuple[int, ...] = ()
    weights: tuple[float, ...] | None = None

    def target(self) -> str:
        """Who the instruction names, in words: '5', or 'group of 4: 0, 1, 2, 3'."""
        if self.partner is not None:
            return str(self.partner)
        return f"group of {len(self.group)}: {members_text(self.group)}"


def members_text(ids, shown: int = 8) -> str:
    """'0, 1, 2' or '0, 1, 2, ... (16)': member ids for a line of text."""
    ids = list(ids)
    head = ", ".join(str(m) for m in ids[:shown])
    return head if len(ids) <= shown else f"{head}, … ({len(ids)})"


@dataclass(frozen=True, slots=True)
class Publication(Record):
    id: int
    model: int
    step: int
    epoch: int
    loss: float
    grad_norm: float
    t: float
    probe1: float | None  # the seed's tracked weight fc1.weight[0, 0]
    probe2: float | None  # and the second layer's weight[0, 0]
    entropy: float | None  # mean normalised activation entropy (surge-collapse on)
    sparsity: float | None  # fraction of exactly-zero weights


@dataclass(frozen=True, slots=True)
class Event(Record):
    id: int
    model: int | None
    kind: str
    step: int | None
    detail: dict
    t: float


@dataclass(frozen=True, slots=True)
class Metric(Record):
    model: int
    epoch: int
    split: str
    loss: float
    accuracy: float


@dataclass(frozen=True, slots=True)
class Generation(Record):
    """Model `model`'s tethers after its `generation`-th change (0: as first published)."""

    model: int
    generation: int
    round: int | None
    step: int
    path: str | None  # relative to the run directory; None when retention dropped it


@dataclass(frozen=True, slots=True)
class Explanation(Record):
    """Everything a decision was based on."""

    decision: Decision
    round_models: list[int]
    compat_row: dict[int, float]  # the model's compat with every model in that round/layer
    merges_before: int  # merges of the model earlier in that epoch
    rule: str
    # a merge the merge guard undid: {"step", "val_loss_before", "val_loss_after"}
    rejected: dict | None = None
    policy: dict = field(default_factory=dict)  # the round's policy settings (schema 3)
    round_groups: list[list[int]] | None = None  # the groups the round saw (schema 3)


@dataclass(frozen=True, slots=True)
class LineageEdge(Record):
    """`model`'s tethers (as of `round`) took in `partner`'s on `layer` at that round."""

    model: int
    partner: int
    round: int
    step: int
    layer: str
    rate: float
    compat: float


@dataclass(frozen=True, slots=True)
class Lineage(Record):
    """Ancestry of a model: every merge that flowed into it, recursively (a DAG)."""

    model: int
    edges: list[LineageEdge] = field(default_factory=list)

    def parents(self, model: int, before_round: float) -> list[LineageEdge]:
        """Merges into `model` strictly before `before_round`, latest first."""
        return sorted(
            (e for e in self.edges if e.model == model and e.round < before_round),
            key=lambda e: -e.round,
        )

    def ancestors(self) -> set[int]:
        return {e.partner for e in self.edges} - {self.model}


@dataclass
class CoordinatorState:
    """What a coordinator knows of a job, as its history records it (`fresh` for a new one).

    A model's latest tether generation is exactly its bank row: tethers change only through
    decisions, and every decision snapshots the models it changed.
    """

    tethers: dict[int, dict] = field(default_factory=dict)  # model -> layer -> array
    generation: dict[int, int] = field(default_factory=dict)  # model -> latest generation
    step: dict[int, int] = field(default_factory=dict)  # model -> latest published step
    epoch: dict[int, int] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)  # stopped training (failed ones too)
    failed: set[int] = field(default_factory=set)  # stopped for good: not ensemble members
    per_epoch: dict[tuple[str, int, int], int] = field(default_factory=dict)  # decisions
    rounds: int = 0
    merges: int = 0
    drifts: int = 0
    publications: int = 0
    rejected: int = 0
    policy: dict = field(default_factory=dict)  # the policy's state as last saved: name -> array
    groups: list[list[int]] | None = None  # the groups the last round saw
    restored: bool = False  # rebuilt from an existing history
