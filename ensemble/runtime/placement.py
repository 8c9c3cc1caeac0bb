"""Where workers go: model ids grouped into workers, and one placement group for all of
them, so a job gets every resource it asks for or waits and then fails clearly. It never
starts half its workers.

`plan` is plain arithmetic on the cluster's totals; `reserve` and `strategy` talk to Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ensemble.config import Config
from ensemble.errors import EnsembleError


@dataclass(frozen=True)
class Plan:
    groups: list[list[int]]  # model ids per worker
    cpus: float  # per worker
    gpus: list[float]  # per worker


def groups_of(count: int, workers: int) -> list[list[int]]:
    """Model ids 0..count-1 in `workers` contiguous groups as equal as can be."""
    return [g.tolist() for g in np.array_split(np.arange(count), max(1, min(workers, count)))]


def plan(cfg: Config, total_cpus: float, total_gpus: float = 0.0) -> Plan:
    """models_per_worker auto: as few workers as the cluster allows, one per GPU when models
    ask for GPUs, else one per CPU; each then trains its models as one stack."""
    r, m = cfg.resources, cfg.models.count
    use_gpus = r.num_gpus_per_model > 0
    if r.models_per_worker == "auto":
        slots = math.floor(total_gpus) if use_gpus else math.floor(total_cpus)
        if slots < 1:
            have = f"{total_gpus:g} GPUs" if use_gpus else f"{total_cpus:g} CPUs"
            raise EnsembleError(
                f"resources.models_per_worker auto: the cluster has {have}, not one whole; "
                "set resources.models_per_worker"
            )
        groups = groups_of(m, slots)
    else:
        k = r.models_per_worker
        groups = [list(range(i, min(i + k, m))) for i in range(0, m, k)]
    cpus = r.num_cpus_per_worker
    if cpus is None:  # share the cluster's CPUs, at most one each
        cpus = min(1.0, math.floor(total_cpus / len(groups) * 100) / 100)
        if cpus < 0.01:
            raise EnsembleError(
                f"{len(groups)} workers do not fit: the cluster has {total_cpus:g} "
                "CPUs (at least 0.01 CPU per worker); raise resources.models_per_worker"
            )
    per_model = r.num_gpus_per_model
    gpus = [
        min(1.0, per_model * len(g)) if r.models_per_worker == "auto" else per_model * len(g)
        for g in groups
    ]
    return Plan(groups, cpus, [g if use_gpus else 0.0 for g in gpus])


def reserve(cfg: Config, p: Plan, timeout: float):
    """A ready placement group with one bundle per worker, or a clear error."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

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


def strategy(pg, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
