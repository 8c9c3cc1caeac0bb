"""Scale: the largest population this 2-core, 24 GB machine completes with stacked workers,
and how the coordinator's round time grows with M.

1. A real job of M models as stacked workers of 64 (default M=256: four actors), with its
   wall time, the coordinator's peak memory and its rounds.
2. The coordinator alone, in this process, for M in a grid: the time of one decision round
   (Gram of every layer, policy, SQLite record) and of one publication, with seed-dtnn
   sized tethers; the exponent of round time vs M from a log-log fit (a Gram is O(M^2 P),
   so between 1 and 2 is expected: P dominates at small M). Ratios are against M=8 in the
   same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PLAIN, case

SIZES = {
    "tiny": {"job_models": 8, "k": 8, "epochs": 1, "grid": [4, 8, 16], "rounds": 3},
    "default": {
        "job_models": 256,
        "k": 64,
        "epochs": 3,
        "grid": [8, 32, 64, 128, 256],
        "rounds": 10,
    },
    "full": {
        "job_models": 256,
        "k": 64,
        "epochs": 20,
        "grid": [8, 32, 64, 128, 256, 512],
        "rounds": 20,
    },
}


def coordinator_times(m: int, rounds: int, root: Path) -> tuple[float, float]:
    """Median seconds of one round and of taking in one report of one model, M models,
    seed-dtnn tethers."""
    from ensemble.config import load_config
    from ensemble.coordinator import Coordinator
    from ensemble.history import HistoryWriter
    from ensemble.protocol import StackReport

    cfg = load_config(
        None, [*PLAIN, f"models.count={m}", f"job=scale-{m}", f"coordinator.round_every={10**9}"]
    )
    shapes = {"fc1": (64, 64), "fc2": (64, 64), "out": (10, 64)}
    c = Coordinator(cfg, shapes, HistoryWriter(root / "history.sqlite", cfg.job, ""))
    rng = np.random.default_rng(0)
    pub = []
    one = np.ones(1)
    for i in range(m):  # every model known
        t = {k: rng.normal(1, 0.1, (1, *s)).astype(np.float32) for k, s in shapes.items()}
        yes = np.ones(1, dtype=bool)
        report = StackReport(np.array([i]), 1, 0, one, one, yes, yes, t)
        t0 = time.perf_counter()
        c.receive(report)
        pub.append(time.perf_counter() - t0)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        c.run_round()
        times.append(time.perf_counter() - t0)
        c.mailbox = {i: [] for i in range(m)}
    c.history.close()
    return float(np.median(times)), float(np.median(pub[1:]))


def run(size: str) -> tuple[list[dict], list[str], dict]:
    from ensemble.config import load_config
    from ensemble.driver import run_job

    cfg = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        job = load_config(
            None,
            [
                *PLAIN,
                f"models.count={cfg['job_models']}",
                f"resources.models_per_worker={cfg['k']}",
                f"train.epochs={cfg['epochs']}",
                "job=scale",
            ],
        )
        t0 = time.perf_counter()
        s = run_job(job, root / "scale")
        wall = time.perf_counter() - t0
        grid = {}
        for m in cfg["grid"]:
            (root / f"c{m}").mkdir()
            grid[m] = coordinator_times(m, cfg["rounds"], root / f"c{m}")
    ms = np.array(list(grid))
    rt = np.array([grid[m][0] for m in ms])
    slope = float(np.polyfit(np.log(ms), np.log(rt), 1)[0])
    base = grid[ms[0]][0]
    cases = [
        case(
            f"round time at M={m} / M={ms[0]}",
            "seconds ratio",
            [grid[m][0] / base],
            round_seconds=grid[m][0],
            publish_seconds=grid[m][1],
        )
        for m in ms
    ]
    cases.append(case("exponent of round time vs M (log-log fit)", "slope", [slope]))
    cases.append(
        case(
            f"a {cfg['job_models']}-model job in stacked workers of {cfg['k']}",
            "completed models / asked",
            [len(s["members"]) / cfg["job_models"]],
            (">=", 1.0),
            wall_seconds=wall,
            job_seconds=s["wall_seconds"],
            coordinator_peak_rss_mb=s["coordinator_peak_rss_mb"],
            rounds=s["rounds"],
            merges=s["merges"],
            drifts=s["drifts"],
            ensemble=s["ensemble"],
        )
    )
    notes = [
        f"grid {list(map(int, ms))}; round = Gram of 3 seed-dtnn layers + threshold "
        "policy + one SQLite transaction with the round's compat matrices (which grow "
        "as M^2)."
    ]
    return cases, notes, cfg
