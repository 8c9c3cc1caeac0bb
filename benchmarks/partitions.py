"""Merging where it pays: members that see different data.

The quality study's machinery (benchmarks/quality.py) on a partition axis: each member
trains only on its own share of the training split, and validates on its share of the
validation split; the test split is whole.

- Partitions: label-skewed shards, Dirichlet(alpha) with alpha 0.1, 0.3 and 1; IID shards
  (`shard`); full data (`iid`, every member on all of it).
- Datasets: digits and breast_cancer.
- Rows: the local-only ensemble (no merging: the reference), FedAvg's global model (the
  members' plain average after the last round, one model), the ensembles of the population
  policies and of the pairwise default, with `policy.share` weights (each member keeps its
  own tether: personalisation), tethers or both. Every row spells out its policy keys, so
  it means what it says whatever the defaults are.
- The recommendation is chosen per regime on validation only: one row for full data (the
  local-only reference may win: then the default does not merge there), one for members
  that see different data.

Base: configs/default.yaml as is (8 models of 64-64, 20 epochs, batch 32); an epoch is a
pass's worth of steps over the whole training split for every partition, so every row and
partition trains for the same steps.
"""

from __future__ import annotations

from benchmarks.quality import GLOBAL, Study, run_study, write_report

PARTITIONS = ["dirichlet:0.1", "dirichlet:0.3", "dirichlet:1", "shard", "iid"]
DATASETS = [f"{d}@{p}" for d in ("digits", "breast_cancer") for p in PARTITIONS]

SHARED = ["model.init=shared", "policy.align=false", "policy.guard=false"]
VARIANTS: dict[str, list[str]] = {
    "local-only": ["policy.name=none"],
    "FedAvg global model": ["policy.name=fedavg", *SHARED, "policy.share=both", GLOBAL],
    "fedavg ensemble": ["policy.name=fedavg", *SHARED, "policy.share=both"],
    "fedavg, personal tethers": ["policy.name=fedavg", *SHARED, "policy.share=weights"],
    "fedavg, personal tethers std 0.3": [
        "policy.name=fedavg",
        *SHARED,
        "policy.share=weights",
        "tether.std=0.3",
    ],
    "mean 0.5, personal tethers": [
        "policy.name=mean",
        "policy.alpha=0.5",
        *SHARED,
        "policy.share=weights",
    ],
    "mean 0.9, both": ["policy.name=mean", "policy.alpha=0.9", *SHARED, "policy.share=both"],
    "mean 0.5, independent inits, aligned": [
        "policy.name=mean",
        "policy.alpha=0.5",
        "model.init=independent",
        "policy.align=true",
        "policy.guard=false",
        "policy.share=both",
    ],
    "pairs (the full-data default)": [
        "policy.name=threshold",
        "model.init=independent",
        "compat.fn=cka",
        "policy.align=true",
        "policy.share=both",
        "policy.guard=true",
        "policy.drift=repulsive",
    ],
}
SIZES = {
    "tiny": {
        "set": ["models.count=3", "train.epochs=1", "model.layers=[8]"],
        "seeds": 1,
        "datasets": ["digits@dirichlet:0.3", "digits@iid"],
        "variants": ["local-only", "FedAvg global model", "mean 0.5, personal tethers"],
    },
    "default": {"set": [], "seeds": 5, "datasets": DATASETS, "variants": None},
    "full": {"set": [], "seeds": 10, "datasets": DATASETS, "variants": None},
}
PARTITIONED = Study(
    "partitions",
    "Merging where it pays: members that see different data",
    VARIANTS,
    baselines=("local-only", "FedAvg global model"),
    reference="local-only",
    base=[],
    sizes=SIZES,
    regimes={
        "full data": lambda d: d.endswith("@iid"),
        "different data": lambda d: not d.endswith("@iid"),
    },
    reference_can_win=True,
)


def run(size: str):
    return run_study(size, PARTITIONED)


__all__ = ["PARTITIONED", "run", "write_report"]
