"""Every message between a worker and the coordinator, in one file.

One call each way per exchange: a worker sends a `StackReport` for its whole stack of k
models every `trigger.poll_steps` steps (and at each epoch's end); the coordinator answers
with a `Reply` holding the instructions for that stack. `JoinRequest` opens (or reopens,
after a restart or rollback) a stack's conversation. `MemberResult` goes to the driver.

Arrays are numpy so they cross Ray zero-copy. Per-model values are (k,) arrays in the order
of `models`; per-layer tensors of the publishing models are one (n_pub, ...) array a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Kind = Literal["merge", "drift", "sync"]
ENSEMBLE = -1  # the model id of the ensemble's own metrics (never a partner)


@dataclass(frozen=True)
class Instruction:
    """Coordinator -> worker: change `model`'s tether of `layer` relative to a target.

    `group`: the members the target comes from. A merge moves toward their (weighted:
    `weights`, in group order; None: equal) mean; a pair's group is its one partner; a
    FedAvg group is the whole population (the member itself included). A drift moves away
    from its group (one partner, or every other member: the repulsive drift).
    merge: T <- (1 - rate) T + rate T_target (unless `share` is weights: T stays).
    drift: T <- clip(T + rate (T - T_target)).
    sync: T <- partner_tether, the coordinator's record of this model's own tether (sent after
    a restart or rollback, so worker and coordinator agree again; group == (model,)).
    `partner_tether` is the target tether at decision time, so the worker needs nothing else;
    with alignment it is already permuted into this model's unit order; a repulsive drift's
    is T - r, r the repulsion from all others.
    `partner_weights` (share weights or both): what to add, times `rate`, to this model's
    weights and bias: (target's - its own as reported), of W (weights) or of W * T (both).
    A difference, not a target, so the steps a model trained since it reported are kept.
    `step`: the model's step when the coordinator decided it (staleness = applied - step).
    """

    kind: Kind
    model: int
    group: tuple[int, ...]
    layer: str
    rate: float
    compat: float
    rule: str
    weights: np.ndarray | tuple[float, ...] | None = field(default=None, compare=False, repr=False)
    partner_tether: np.ndarray | None = field(default=None, compare=False, repr=False)
    partner_weights: tuple[np.ndarray, np.ndarray] | None = field(
        default=None, compare=False, repr=False
    )
    round: int | None = field(default=None, compare=False)  # the decision round, once recorded
    step: int | None = field(default=None, compare=False)
    share: str = "tethers"  # a merge: what it averages, tethers | weights | both
    whole: bool = False  # the target is its group as a whole (its mean), even a group of one

    @property
    def partner(self) -> int | None:
        """The one other member of a pair (None for a target group)."""
        if self.whole or len(self.group) != 1 or self.group[0] == self.model:
            return None
        return self.group[0]


def merge(ti: np.ndarray, tj: np.ndarray, alpha: float) -> np.ndarray:
    """T_i <- (1 - alpha) T_i + alpha T_j; alpha = 0.5 is the seed's average."""
    return ((1.0 - alpha) * ti + alpha * tj).astype(ti.dtype, copy=False)


def drift(ti: np.ndarray, tj: np.ndarray, eta: float, lo: float, hi: float) -> np.ndarray:
    """Push T_i away from T_j, then clip into the tether range [lo, hi]."""
    return np.clip(ti + eta * (ti - tj), lo, hi).astype(ti.dtype, copy=False)


def merge_weights(
    w: np.ndarray, t_old: np.ndarray, t_new: np.ndarray, delta_eff: np.ndarray, alpha: float
) -> np.ndarray:
    """Weight merge of tethered weights: the new W such that
    W * t_new = W * t_old + alpha * delta_eff, delta_eff the partner's W * T minus this
    model's (as reported). Where a merged tether is (near) zero the layer's output ignores W,
    so W is kept."""
    eff = w * t_old + alpha * delta_eff
    ok = np.abs(t_new) > 1e-3
    return np.where(ok, eff / np.where(ok, t_new, 1.0), w).astype(w.dtype, copy=False)


def apply_instruction(tether: np.ndarray, ins: Instruction, lo: float, hi: float) -> np.ndarray:
    """The one place merge/drift maths meets an instruction: the coordinator's bank and the
    worker's model both change through it, so they stay equal."""
    assert ins.partner_tether is not None and ins.partner_tether.shape == tether.shape
    if ins.kind == "merge":
        if ins.share == "weights":  # the tether is the model's own: it stays
            return tether.astype(tether.dtype, copy=True)
        return merge(tether, ins.partner_tether, ins.rate)
    if ins.kind == "sync":
        return ins.partner_tether.astype(tether.dtype, copy=True)
    return drift(tether, ins.partner_tether, ins.rate, lo, hi)


@dataclass(frozen=True)
class Event:
    """Something that happened to a model (surge-collapse, quarantine, rollback, ...)."""

    kind: str
    model: int | None
    step: int | None
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """The merge guard undid `merges` of `model`: they raised its validation loss."""

    model: int
    step: int
    merges: tuple[Instruction, ...]
    loss_before: float
    loss_after: float
    tethers: dict[str, np.ndarray]  # the model's tethers once undone, layer -> array


@dataclass(frozen=True)
class EpochReport:
    """A stack's scores at the end of an epoch, one evaluation pass for all k models."""

    epoch: int
    models: np.ndarray  # (k_live,) ids
    train: np.ndarray  # (k_live, 2): loss, accuracy
    val: np.ndarray  # (k_live, 2)
    val_probs: np.ndarray  # (k_live, N_val, C) float32


@dataclass(frozen=True)
class StackReport:
    """Worker -> coordinator, once per exchange, for the whole stack."""

    models: np.ndarray  # (k,) model ids of the stack
    step: int  # the stack's step (every model in it has taken this many)
    epoch: int  # the epoch being trained
    losses: np.ndarray  # (k,) latest loss of each model
    grad_norms: np.ndarray  # (k,) latest gradient norm
    published: np.ndarray  # (k,) bool: who publishes (its trigger fired)
    # Tethers change only through the coordinator's instructions, so it already holds them:
    # a report carries a model's tethers only when the coordinator lacks them (its first
    # publication, or after a restarted coordinator asked). introduced: (k,) bool, whose.
    introduced: np.ndarray
    tethers: dict[str, np.ndarray]  # layer -> (n_introduced, *shape)
    # compat.fn cka: layer -> (n_pub, n, n) centred Gram of its outputs on the probe batch
    features: dict[str, np.ndarray] | None = None
    # function space: (n_pub, n, C) class probabilities on the probe batch
    outputs: np.ndarray | None = None
    # alignment or weights shared: layer -> ((n_pub, *W) trained weights, (n_pub, *b) biases)
    weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    probes: dict[str, np.ndarray] | None = None  # name -> (k,): probe1, probe2, sparsity, entropy
    events: tuple[Event, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    rejoined: tuple[tuple[int, str], ...] = ()  # (model, why): rolled back, wants a sync
    epoch_report: EpochReport | None = None
    finished: np.ndarray | None = None  # (k,) bool: stopped for good this exchange
    failed: np.ndarray | None = None  # (k,) bool: of those, stopped because they failed
    final: bool = False  # the stack has nothing more to train
    staleness: tuple[int, ...] = ()  # per instruction applied: steps from decision to use

    def published_ids(self) -> np.ndarray:
        return self.models[self.published]

    def introduced_ids(self) -> np.ndarray:
        return self.models[self.introduced]


@dataclass(frozen=True)
class JoinRequest:
    """Worker -> coordinator before training: who is here, at which step, and why."""

    models: np.ndarray  # (k,) ids
    step: int
    reason: str  # "started" | "restarted" | "resumed"
    where: dict = field(default_factory=dict)  # node, pid, device: for the history


@dataclass(frozen=True)
class Reply:
    """Coordinator -> worker: every instruction decided for the stack since its last call,
    in decision order; and the models whose tethers it does not hold (send them)."""

    instructions: tuple[Instruction, ...] = ()
    unknown: tuple[int, ...] = ()


@dataclass(frozen=True)
class MemberResult:
    """What a finished worker hands back to the driver, one per model."""

    model: int
    steps: int
    test_probs: np.ndarray  # (N_test, C) float32
    weights: dict[str, np.ndarray]  # the member's state: module keys, plus tether.<layer>
    blocked_seconds: float  # time its worker spent waiting on the coordinator
    train_seconds: float
    failed: bool = False  # stopped after a non-finite loss: not an ensemble member
