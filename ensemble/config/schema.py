"""The job's schema: frozen pydantic sections, every field with its default and a one-line
reason. Unknown keys are rejected; every error names the field path and the bad value.
One file on purpose: it is the reference docs/configuration.md follows, top to bottom."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ensemble.history.retention import parse_retention

JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the whole name: fullmatch
YAML_MAX_DEPTH = 64  # a config is a few levels deep; 3,000 overflowed the composer's stack
YAML_MAX_NODES = 100_000  # values once aliases are expanded: a 700-byte alias bomb is 10^6
MAX_CLASSES = 10_000  # labels are classes, a logit each; an id past this is not a class
MAX_VALUES = 1 << 30  # synthetic and text data: samples x features (4 GB as float32)
MAX_WIDTH = 1 << 20  # units of one hidden layer (the whole model is checked against memory later)


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or bool in get_args(annotation) or annotation is Any


def refuse_renamed(values: Any, key: str, why: str) -> None:
    """A section's validator: a key an earlier release had, now renamed, is refused with
    `why` (what replaced it), never silently ignored."""
    if isinstance(values, dict) and key in values:
        raise ValueError(why)


class Section(BaseModel):
    # every float finite: .inf and .nan are never a meaningful rate, size or bound
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        """`models.count: true` is a mistake, not 1: a bool only where a bool is meant."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, bool) and field is not None and not _takes_bool(field.annotation):
            raise ValueError("expected a number or a name, not a boolean")
        return v


class ModelsConfig(Section):
    count: int = Field(8, ge=1, le=4096)  # ensemble size M


class ModelConfig(Section):
    preset: str = "seed-dtnn"  # named hidden-layer layout, see ensemble.training.model.PRESETS
    layers: list[int] | None = None  # explicit hidden sizes; overrides the preset when set
    # shared: every member starts from model 0's weights and tethers (as in model soups) and
    # diverges through its own data order; independent: each member has its own init
    init: Literal["independent", "shared"] = "independent"
    # your own module: "package.module:function" or "path/to/file.py:function" (a relative
    # path is from where the job starts), called as function(features, classes, **options)
    # and returning an nn.Module whose forward maps (B, features) to (B, classes) logits;
    # None: the built-in MLP of `preset` / `layers`
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the factory
    # which layers carry tethers: module names (e.g. "features.0") or type names ("Linear",
    # "Conv2d"); None: every nn.Linear and nn.Conv2d
    tethered: list[str] | None = None

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str | None) -> str | None:
        if v is None:
            return v
        target, sep, fn = v.rpartition(":")
        if not sep or not target or not fn.isidentifier():
            raise ValueError(
                f"expected 'package.module:function' or 'path/to/file.py:function', got {v!r}"
            )
        if target.endswith(".py"):  # workers load it by path: make it absolute here
            return f"{Path(target).expanduser().resolve()}:{fn}"
        return v

    @field_validator("layers")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(n < 1 for n in v)):
            raise ValueError(f"hidden sizes must be a non-empty list of positive ints, got {v}")
        if v is not None and max(v) > MAX_WIDTH:
            raise ValueError(f"hidden sizes must be at most {MAX_WIDTH:,} units")
        return v


class DataConfig(Section):
    name: str = "digits"  # dataset registry name, see ensemble.data.DATASETS
    val_fraction: float = Field(0.15, gt=0, lt=0.5)  # held out for per-epoch validation
    test_fraction: float = Field(0.25, gt=0, lt=0.5)  # held out for the final summary
    # which rows each model trains on: iid, all of them (each its own shuffles); shard, a
    # disjoint random slice each; dirichlet, label-skewed slices, each class split across
    # the models by a Dirichlet(alpha) draw; column, by client (data.member_column). A
    # model validates and is tested (its personal score) on its own slice's share of the
    # validation and test splits; the whole test split gives the global scores
    partition: Literal["iid", "shard", "dirichlet", "column"] = "iid"
    alpha: float = Field(0.3, gt=0)  # dirichlet: smaller is more skewed (0.1: a class or two)
    # csv / parquet: a column naming each row's client (site, sensor, user); each distinct
    # value is one client, dealt to the members in turn; not a feature. Implies partition
    # column
    member_column: str | None = None
    # groups of members whose data differ: member i is in group i * groups // models.count,
    # and group g sees every split through `shift` (ensemble.data.groups); group 0 sees the data
    # as loaded. Composes with every partition
    groups: int = Field(1, ge=1)
    # how group g differs from group 0: none; rotate, images turned by g * 90 degrees;
    # permute_labels, a seeded permutation of the classes; permute_features, a seeded
    # order of the feature columns. Seeded by the job's seed
    shift: Literal["none", "rotate", "permute_labels", "permute_features"] = "none"
    # one sample's shape as an image, [H, W] or [C, H, W] (rotate); digits' [8, 8] is built in
    image_shape: list[int] | None = None
    data_file: str = "data_input.txt"  # text dataset: whitespace-separated floats
    labels_file: str = "labels_input.txt"  # text dataset: one integer label per sample
    samples: int = Field(3200, ge=2)  # text/synthetic: declared number of samples
    features: int = Field(128, ge=1)  # text/synthetic: declared width of one sample
    classes: int = Field(10, ge=2, le=MAX_CLASSES)  # text/synthetic: labels lie in [0, classes)
    create_missing: bool = False  # text: write random files when absent, as the seed does
    # your own data (ensemble.data.userdata): csv / parquet, a table file with one row a sample
    path: str | None = None
    label_column: str = "label"  # csv / parquet: the class column; the rest are features
    x_path: str | None = None  # npy: samples (samples x features, or any shape: flattened)
    y_path: str | None = None  # npy: one label per sample
    # factory: "package.module:function" or "path/to/file.py:function", called with options
    # as keyword arguments, returning (x, y) arrays or a torch Dataset of (x, y) pairs
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    standardize: bool = True  # csv / parquet / npy / factory: by the training split's stats

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        refuse_renamed(
            values,
            "shard",
            "data.shard was replaced by data.partition: use data.partition=shard for "
            "disjoint slices (shard: true) or leave data.partition=iid (shard: false)",
        )
        if isinstance(values, dict) and values.get("member_column") is not None:
            if values.get("partition", "column") != "column":
                raise ValueError(
                    f"data.member_column splits the rows by client; data.partition "
                    f"{values['partition']!r} cannot also split them (leave it unset)"
                )
            values = {**values, "partition": "column"}
        if isinstance(values, dict) and "name" not in values:  # the kind the keys imply
            path = str(values.get("path") or "")
            if values.get("factory"):
                values = {**values, "name": "factory"}
            elif values.get("x_path"):
                values = {**values, "name": "npy"}
            elif path.endswith((".parquet", ".pq")):
                values = {**values, "name": "parquet"}
            elif path:
                values = {**values, "name": "csv"}
        return values

    @field_validator("path", "x_path", "y_path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        """Relative to where the job starts (its workers may run elsewhere)."""
        return None if v is None else str(Path(v).expanduser().resolve())

    @field_validator("factory")
    @classmethod
    def _data_factory(cls, v: str | None) -> str | None:
        return ModelConfig._factory(v)

    @model_validator(mode="after")
    def _files(self) -> DataConfig:
        needs = {"csv": "path", "parquet": "path", "npy": "x_path", "factory": "factory"}
        key = needs.get(self.name)
        if key and getattr(self, key) is None:
            raise ValueError(f"data.name {self.name}: set data.{key}")
        if self.name == "npy" and self.y_path is None:
            raise ValueError("data.name npy: set data.y_path (one label per sample)")
        if self.partition == "column" and self.member_column is None:
            raise ValueError("data.partition column: set data.member_column (the client column)")
        if self.member_column is not None and self.name not in ("csv", "parquet"):
            raise ValueError(
                f"data.member_column: only csv and parquet tables have columns; data.name "
                f"is {self.name!r}"
            )
        if self.member_column is not None and self.member_column == self.label_column:
            raise ValueError(f"data.member_column {self.member_column!r} is the label column")
        if self.image_shape is not None and (
            len(self.image_shape) not in (2, 3) or min(self.image_shape) < 1
        ):
            raise ValueError(
                f"data.image_shape {self.image_shape}: expected [H, W] or [C, H, W] of "
                "positive sizes"
            )
        if self.shift != "none" and self.groups < 2:
            raise ValueError(
                f"data.shift {self.shift}: shifts how groups differ; set data.groups >= 2"
            )
        if self.name in ("synthetic", "text") and self.samples * self.features > MAX_VALUES:
            raise ValueError(
                f"data.samples x data.features is {self.samples * self.features:,} values; "
                f"at most {MAX_VALUES:,}"
            )
        return self


class TrainConfig(Section):
    epochs: int = Field(20, ge=1)  # passes over each model's training data
    batch_size: int = Field(32, ge=1)  # the seed's batch size
    lr: float = Field(1e-3, gt=0)  # Adam learning rate, the seed's default


class TetherConfig(Section):
    init: Literal["uniform", "ones", "normal"] = "normal"  # uniform is the seed's U[0,1)
    std: float = Field(0.1, ge=0)  # spread of the `normal` init around 1
    min: float = 0.0  # drift clips tethers into [min, max]
    max: float = 2.0


class CompatConfig(Section):
    # registry name, see ensemble.coordination.compat.COMPAT; cka (function space) won the quality
    # benchmark on validation data (README, "Does merging pay?")
    fn: str = "cka"
    normalize: Literal["none", "zscore"] = "zscore"  # zscore: thresholds in standard deviations
    probe_size: int = Field(64, ge=4)  # cka: validation inputs in the fixed probe batch


class PolicyConfig(BaseModel):
    """`policy.name` and the chosen policy's own settings, as given.

    Each policy declares its settings, their defaults and checks in its own pydantic model
    (coordination.policies); the config stores names only and never imports the registry, so the
    settings are validated against the policy named by `ensemble.runtime.job.check`, before any
    work starts: a key the policy does not take is an error naming it and the keys it
    takes. config.yaml holds them complete (`coordination.policies.resolve`).
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    # registry name, see coordination.policies.POLICIES: fedavg, fedamp, threshold, mean, seed,
    # none; auto: the default policy (coordination.policies.DEFAULT)
    name: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        refuse_renamed(
            values,
            "merge",
            "policy.merge was replaced by policy.share: tethers stays tethers, weights "
            "is now both (tethers and tethered weights); weights averages W alone",
        )
        return values


class TriggerConfig(Section):
    name: Literal["plateau", "every_k_steps"] = "plateau"  # when a worker publishes
    loss_threshold: float = Field(0.1, ge=0)  # plateau: |loss - previous loss| below this
    grad_threshold: float = Field(0.1, ge=0)  # plateau: gradient norm below this
    k: int = Field(10, ge=1)  # every_k_steps: publish every k steps
    cooldown_steps: int = Field(10, ge=0)  # min steps between publications of one model
    poll_steps: int = Field(10, ge=1)  # steps between a worker's exchanges with the coordinator


class CoordinatorConfig(Section):
    round_every: int | None = Field(None, ge=1)  # publications per round; None: one per model
    # sync: every worker waits at each exchange (every trigger.poll_steps steps) until all
    # have reported; rounds fall at fixed steps and a seed gives one ensemble, on Ray or in
    # one process. async: workers never wait; a round works on the latest bank it has.
    mode: Literal["sync", "async"] = "sync"


class DynamicsConfig(Section):
    mode: Literal["off", "fixed", "entropy"] = "off"  # surge-collapse dynamics per worker
    sparsity: float = Field(0.5, ge=0, lt=1)  # collapse: fraction of each W set to zero
    recovery_rate: float = Field(0.1, ge=0)  # surge: std of the noise refilling zeros
    collapse_every: int = Field(100, ge=1)  # fixed: the seed's collapse period (steps)
    surge_every: int = Field(200, ge=1)  # fixed: the seed's surge period (steps)
    bins: int = Field(32, ge=2)  # entropy: histogram bins for activation entropy
    high_entropy: float = Field(0.72, gt=0, le=1)  # entropy: collapse + energy above this
    low_entropy: float = Field(0.45, ge=0, lt=1)  # entropy: input noise below this
    plateau_window: int = Field(40, ge=2)  # entropy: steps over which a plateau is judged
    plateau_tol: float = Field(0.005, ge=0)  # entropy: plateau if the half-window means
    # differ by less than this (digits' normalised entropy sits in 0.4-0.75, noise ~0.05)
    energy: float = Field(0.05, ge=0)  # energy injection: noise as a fraction of std(W)
    input_noise: float = Field(0.1, ge=0)  # low entropy: std of noise added to inputs
    noise_steps: int = Field(10, ge=1)  # low entropy: how long the input noise lasts
    cooldown: int = Field(50, ge=0)  # entropy: steps between two actions

    @model_validator(mode="after")
    def _ordered(self) -> DynamicsConfig:
        if self.low_entropy >= self.high_entropy:
            raise ValueError(
                f"low_entropy ({self.low_entropy}) must be < high_entropy ({self.high_entropy})"
            )
        return self


class PeerConfig(Section):
    name: str  # a label for the history
    layer: str  # the layer whose tether the file holds, e.g. fc2
    file: str  # whitespace-separated floats, (out x in) of that layer
    create_missing: bool = False  # write a U[0,1) tether when absent, as the seed does


class FaultsConfig(Section):
    max_restarts: int = Field(3, ge=0)  # restarts of a worker or the coordinator actor
    # a worker checkpoints at an epoch start once this long has passed since its last
    # checkpoint (0: every epoch); a restart or --resume continues from there
    checkpoint_seconds: float = Field(10.0, ge=0)
    on_poison: Literal["rollback", "stop"] = "rollback"  # NaN/Inf loss: last checkpoint, or stop
    max_rollbacks: int = Field(2, ge=0)  # per model; then it is stopped
    call_retries: int = Field(10, ge=0)  # retries of a call to a restarting coordinator
    stall_seconds: float = Field(300.0, gt=0)  # fail the job if no model progresses this long


class ResourcesConfig(Section):
    num_cpus_per_worker: float | None = Field(None, gt=0)  # None: share the cluster's CPUs
    num_gpus_per_model: float = Field(0.0, ge=0)  # fractional packs: 0.25 = 4 models a GPU
    # models a worker actor trains as one stacked computation; auto: as few workers as the
    # cluster allows, one per GPU (with num_gpus_per_model > 0) or one per CPU
    models_per_worker: int | Literal["auto"] = Field("auto")
    placement: Literal["spread", "pack"] = "pack"  # placement group strategy for workers
    placement_timeout: float = Field(120.0, gt=0)  # wait this long for resources, then fail
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when given a GPU

    @field_validator("models_per_worker")
    @classmethod
    def _per_worker(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be 'auto' or an integer >= 1, got {v}")
        return v


class TrackingConfig(Section):
    # TensorBoard scalars in <run dir>/tensorboard: per member and epoch, loss and accuracy;
    # per round, merges, drifts and rejections (needs the `tracking` extra)
    tensorboard: bool = False


class HistoryConfig(Section):
    generations: str = "all"  # tether snapshots to keep per model: all | every:K | last:N
    # the rounds whose compatibility matrices are kept: all | every:K (round ids that are
    # multiples of K, and the first) | none | auto: all up to 512 models, every:10 beyond
    # (at 4,096 models one round's matrices are 100 MB)
    compat: str = "auto"

    @field_validator("generations")
    @classmethod
    def _retention(cls, v: str) -> str:
        parse_retention(v)
        return v

    @field_validator("compat")
    @classmethod
    def _compat(cls, v: str) -> str:
        kind, _, k = v.partition(":")
        if v in ("auto", "all", "none") or (kind == "every" and k.isdigit() and int(k) >= 1):
            return v
        raise ValueError(f"{v!r}: expected 'auto', 'all', 'every:K' (K >= 1) or 'none'")

    def compat_every(self, models: int) -> int:
        """Keep round r's matrices when r % K == 0 or r == 1; 0: keep none."""
        v = self.compat
        if v == "auto":
            v = "all" if models <= 512 else "every:10"
        if v in ("all", "none"):
            return int(v == "all")
        return int(v.partition(":")[2])


class Config(Section):
    job: str | None = None  # run name; None picks "<data>-<timestamp>"
    seed: int = Field(0, ge=0, lt=2**32)  # seeds data splits, inits and shuffles (numpy's range)
    models: ModelsConfig = ModelsConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    tether: TetherConfig = TetherConfig()
    compat: CompatConfig = CompatConfig()
    policy: PolicyConfig = PolicyConfig()
    trigger: TriggerConfig = TriggerConfig()
    coordinator: CoordinatorConfig = CoordinatorConfig()
    history: HistoryConfig = HistoryConfig()
    tracking: TrackingConfig = TrackingConfig()
    dynamics: DynamicsConfig = DynamicsConfig()
    faults: FaultsConfig = FaultsConfig()
    resources: ResourcesConfig = ResourcesConfig()
    peers: list[PeerConfig] = []  # fixed external tethers, the seed's other model

    @field_validator("job")
    @classmethod
    def _job_name(cls, v: str | None) -> str | None:
        if v is not None and not JOB_NAME.fullmatch(v):
            raise ValueError(
                f"job name {v!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                "and start with a letter or digit"
            )
        return v

    @model_validator(mode="after")
    def _across(self) -> Config:
        # Names (model.preset, data.name, compat.fn, policy.name) are looked up in their
        # registries by runtime.job.check before any work starts; config never imports them.
        if self.compat.fn == "cka" and self.peers:
            raise ValueError(
                "compat.fn: cka compares models by their outputs on a probe batch, and fixed "
                "peers have none; use a tether compatibility (cosine, dot, rbf) with peers"
            )
        if self.tether.min >= self.tether.max:
            raise ValueError(f"tether.min ({self.tether.min}) must be < tether.max")
        if self.data.groups > self.models.count:
            raise ValueError(
                f"data.groups ({self.data.groups}) must be at most models.count "
                f"({self.models.count}): every group needs a member"
            )
        return self
