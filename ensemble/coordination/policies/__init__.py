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

from pydantic import BaseModel, ValidationError

from ensemble.coordination.policies.base import (
    DEFAULT,
    Decided,
    LayerView,
    NoPolicy,
    Policy,
    Population,
    Round,
)
from ensemble.coordination.policies.federated import FedAMPPolicy, FedAvgPolicy, MeanPolicy
from ensemble.coordination.policies.gravity import GravityPolicy
from ensemble.coordination.policies.pairs import SeedPolicy, ThresholdPolicy
from ensemble.errors import ConfigError

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
