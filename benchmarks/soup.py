"""The soup: one model from the ensemble (issue 14, "Consolidation").

Each (dataset, configuration, seed) is one whole job in one process (as the quality study
runs them); then `ensemble.outputs.export.soup`: the members aligned to the best one (by
validation accuracy) and averaged, greedily, each joining only if the soup's validation
accuracy does not drop. Reported beside it on the test split: the best member (chosen on
validation) and the ensemble (the mean of the members' probabilities).

Configurations: the default (policy.name auto) on full data, where the members train
independently from their own inits (the soup has to align them); the same with one shared
init (the model-soup setting); and the default on label-skewed shards, where federated
averaging leaves the members one model (the soup is that model).

Cases: soup test accuracy / the best member's (target >= 1), soup test accuracy / the
ensemble's, soup test NLL / the best member's; paired by seed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import case
from benchmarks.quality import BASE_CONFIG, _init_worker, dataset_overrides

CONFIGS: dict[str, tuple[str, list[str]]] = {
    "digits, full data": ("digits@iid", []),
    "breast_cancer, full data": ("breast_cancer@iid", []),
    "wine, full data": ("wine@iid", []),
    "digits, full data, shared init": ("digits@iid", ["model.init=shared"]),
    "digits, dirichlet 0.3": ("digits@dirichlet:0.3", []),
}
SIZES = {
    "tiny": {"set": ["models.count=3", "train.epochs=1", "model.layers=[8]"], "seeds": 1},
    "default": {"set": [], "seeds": 5},
    "full": {"set": [], "seeds": 10},
}


def soup_run(task: tuple[str, str, list[str], int]) -> dict:
    from ensemble.config import load_config
    from ensemble.outputs.export import soup
    from ensemble.runtime.job import drive, make_trainer, open_coordinator, prepare

    label, dataset, overrides, seed = task
    cfg = load_config(
        BASE_CONFIG, [*overrides, *dataset_overrides(dataset), f"seed={seed}", f"job=soup-{seed}"]
    )
    prep = prepare(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-soup-") as tmp:
        coord = open_coordinator(prep, Path(tmp))
        try:
            t = make_trainer(prep, list(range(cfg.models.count)), checkpoint_dir=Path(tmp) / "c")
            drive([t], coord)
        finally:
            coord.history.close()
    states = {int(m): t.stack.member_state(i) for i, m in enumerate(t.ids) if not t.failed[i]}
    t0 = time.perf_counter()
    s = soup(cfg, prep.data, states)
    r = s.report
    return {
        "config": label,
        "seed": seed,
        "soup_acc": r["soup"]["test"]["accuracy"],
        "soup_nll": r["soup"]["test"]["nll"],
        "best_acc": r["best_member"]["test"]["accuracy"],
        "best_nll": r["best_member"]["test"]["nll"],
        "ensemble_acc": r["ensemble"]["test"]["accuracy"],
        "ensemble_nll": r["ensemble"]["test"]["nll"],
        "soup_members": len(s.members),
        "members": len(states),
        "soup_seconds": round(time.perf_counter() - t0, 3),
    }


def run(size: str):
    s = SIZES[size]
    seeds = int(os.environ.get("QUALITY_SEEDS") or s["seeds"])
    tasks = [
        (label, dataset, [*s["set"], *extra], seed)
        for seed in range(seeds)
        for label, (dataset, extra) in CONFIGS.items()
    ]
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(2, initializer=_init_worker) as pool:
        runs = pool.map(soup_run, tasks)
    wall = time.perf_counter() - t
    cases, notes = [], []
    for label in CONFIGS:
        mine = sorted((r for r in runs if r["config"] == label), key=lambda r: r["seed"])

        def ratio(a: str, b: str, mine=mine) -> list[float]:
            return [r[a] / r[b] for r in mine]

        def mean(k: str, mine=mine) -> float:
            return float(np.mean([r[k] for r in mine]))

        details = {k: mean(k) for k in ("soup_acc", "best_acc", "ensemble_acc", "soup_members")}
        cases += [
            case(
                f"{label}: soup vs best member",
                "soup test accuracy / the best member's (paired by seed)",
                ratio("soup_acc", "best_acc"),
                (">=", 1.0),
                **details,
            ),
            case(
                f"{label}: soup vs ensemble",
                "soup test accuracy / the ensemble's (paired by seed)",
                ratio("soup_acc", "ensemble_acc"),
            ),
            case(
                f"{label}: soup NLL vs best member",
                "soup test NLL / the best member's (paired by seed)",
                ratio("soup_nll", "best_nll"),
            ),
        ]
        notes.append(
            f"{label}: test accuracy soup {mean('soup_acc'):.4f}, best member "
            f"{mean('best_acc'):.4f}, ensemble {mean('ensemble_acc'):.4f}; test NLL soup "
            f"{mean('soup_nll'):.4f}, best member {mean('best_nll'):.4f}, ensemble "
            f"{mean('ensemble_nll'):.4f}; {mean('soup_members'):.1f} of "
            f"{mean('members'):.0f} members in the soup (mean over {len(mine)} seeds)."
        )
    notes.append(
        f"{len(runs)} jobs on 2 processes in {wall:.0f} s; configs/all-data.yaml with "
        f"{s['set']} and each configuration's keys."
    )
    return cases, notes, {"configs": CONFIGS, "runs": runs, "wall_seconds": round(wall, 2)}
