"""Where workers go: model ids grouped into workers, and one placement group for all of
them, so a job gets every resource it asks for or waits and then fails clearly. It never
starts half its workers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ensemble.config import Config
from ensemble.errors import EnsembleError


@dataclass(frozen=True)
class Plan:
    groups: list[list[int]]  # model ids per worker
    cpus: float  # per worker
    gpus: list[float]  # per worker: num_gpus_per_model * its models


def plan(cfg: Config) -> Plan:
    k = cfg.resources.models_per_worker
    ids = list(range(cfg.models.count))
    groups = [ids[i : i + k] for i in range(0, len(ids), k)]
    cpus = cfg.resources.num_cpus_per_worker
    if cpus is None:  # share the cluster's CPUs, at most one each
        total = float(ray.cluster_resources().get("CPU", 0))
        cpus = min(1.0, math.floor(total / len(groups) * 100) / 100)
        if cpus < 0.01:
            raise EnsembleError(
                f"{len(groups)} workers do not fit: the cluster has {total:g} "
                "CPUs (at least 0.01 CPU per worker); raise "
                "resources.models_per_worker"
            )
    gpus = [cfg.resources.num_gpus_per_model * len(g) for g in groups]
    return Plan(groups, cpus, gpus)


def reserve(cfg: Config, p: Plan, timeout: float):
    """A ready placement group with one bundle per worker, or a clear error."""
    bundles = [{"CPU": p.cpus, **({"GPU": g} if g else {})} for g in p.gpus]
    strategy = cfg.resources.placement.upper()  # SPREAD or PACK
    pg = placement_group(bundles, strategy=strategy, name=f"{cfg.job}/workers")
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        have = ray.available_resources()
        raise EnsembleError(
            f"the cluster cannot fit the job: {len(bundles)} workers of {bundles[0]} "
            f"({strategy}); available now: CPU {have.get('CPU', 0):g}, GPU "
            f"{have.get('GPU', 0):g}. Waited {timeout:g}s (resources.placement_timeout)"
        ) from None
    return pg


def strategy(pg, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
