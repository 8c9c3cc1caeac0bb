"""Scale: the largest population this 2-core, 24 GB machine completes with stacked workers,
and how the coordinator's round time grows with M.

1. A real job of M models as stacked workers (default M=256 in workers of 64; --full adds
   4,096 in two workers of 2,048), with its wall time, the coordinator's peak memory, the
   size of its history and the time of a filtered `ensemble history` query on it.
2. The coordinator alone, on one core (BLAS limited to one thread), for M in a grid, each M
   in a fresh process so that its peak memory is its own: the first decision round (every
   row of the Gram computed), the later rounds (only the rows the last round changed), the
   history bytes a round adds, and a full Gram against this machine's matmul rate. Seed-
   dtnn tethers (64x64, 64x64, 10x64: P = 8,832), under the threshold policy and FedAvg.
   The exponent of round time in M is a log-log fit over the grid.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from benchmarks.common import PLAIN, case, layered
from ensemble.coordination.coordinator import peak_rss_mb

SIZES = {
    "tiny": {"jobs": [(8, 8, "default")], "epochs": 1, "grid": [4, 8], "rounds": 2},
    "default": {
        "jobs": [(256, 64, "default")],
        "epochs": 3,
        "grid": [8, 64, 256, 1024, 4096],
        "rounds": 3,
    },
    "full": {
        "jobs": [(256, 64, "default"), (4096, 2048, "default"), (4096, 2048, "threshold")],
        # the default policy is gravity: its 4,096-model job is the second row
        "epochs": 3,
        "grid": [8, 32, 64, 128, 256, 512, 1024, 2048, 4096],
        "rounds": 5,
    },
}
SHAPES = {"fc1": (64, 64), "fc2": (64, 64), "out": (10, 64)}
POLICIES = {"threshold": [], "fedavg": ["policy.name=fedavg"], "gravity": ["policy.name=gravity"]}
PROBE, CLASSES = 64, 10  # gravity's function space: probabilities on a 64-input probe


def coordinator_times(m: int, rounds: int, policy: str) -> dict:
    """One coordinator of M models in this process, on one core: round times, the bytes
    a round adds to the history, a full Gram's time, and this process's peak memory."""
    import torch
    from threadpoolctl import threadpool_limits

    from ensemble.config import load_config
    from ensemble.coordination import maths
    from ensemble.coordination.coordinator import Coordinator
    from ensemble.history import HistoryWriter
    from ensemble.protocol import StackReport

    torch.set_num_threads(1)
    cfg = load_config(
        None,
        [
            *layered(PLAIN, POLICIES[policy]),
            f"models.count={m}",
            f"job=scale-{m}",
            f"coordinator.round_every={10**9}",
        ],
    )
    with threadpool_limits(1), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.sqlite"
        c = Coordinator(cfg, SHAPES, HistoryWriter(path, cfg.job, "", compat_every=1))
        rng = np.random.default_rng(0)
        needs = c.policy.traits(c.policy.s)
        base = {k: rng.normal(0, 0.1, (m, *s)).astype(np.float32) for k, s in SHAPES.items()}

        def publish(step: int) -> None:
            """Every model reports, in stack-sized reports: tethers the first time, and its
            weights (moved a little since the last round) and probe outputs when the
            policy asks for them."""
            for start in range(0, m, 256):
                ids = np.arange(start, min(start + 256, m))
                n = len(ids)
                yes = np.ones(n, dtype=bool)
                first = step == 1
                t = {k: rng.normal(1, 0.1, (n, *s)).astype(np.float32) for k, s in SHAPES.items()}
                extra = {}
                if needs["weights"]:
                    extra["weights"] = {
                        k: (
                            base[k][ids] + rng.normal(0, 0.01, (n, *s)).astype(np.float32) * step,
                            np.zeros((n, s[0]), np.float32),
                        )
                        for k, s in SHAPES.items()
                    }
                if needs["outputs"]:
                    extra["outputs"] = rng.dirichlet(np.ones(CLASSES), (n, PROBE)).astype(
                        np.float32
                    )
                c.receive(
                    StackReport(
                        ids,
                        step,
                        0,
                        np.ones(n),
                        np.ones(n),
                        yes,
                        yes if first else ~yes,
                        t if first else {k: v[:0] for k, v in t.items()},
                        **extra,
                    )
                )

        publish(1)
        times, sizes, instructions = [], [], []
        for r in range(rounds):
            if r:
                publish(r + 1)  # not timed: what the workers send between rounds
            before = path.stat().st_size + _wal(path)
            t0 = time.perf_counter()
            instructions.append(len(c.run_round()))
            times.append(time.perf_counter() - t0)
            sizes.append(path.stat().st_size + _wal(path) - before)
            c.mailbox = {i: [] for i in range(m)}
        out = np.empty((m, m), dtype=np.float32)
        gram = []
        for _ in range(3):
            t0 = time.perf_counter()
            for layer in SHAPES:
                x = c.bank.buffers[layer]
                maths.gram(x, out=out)
            gram.append(time.perf_counter() - t0)
        n = 1024
        a = rng.random((n, n), dtype=np.float32)
        mm = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            mm.append(time.perf_counter() - t0)
        c.history.close()
    p = sum(int(np.prod(s)) for s in SHAPES.values())
    return {
        "first_round_seconds": times[0],
        "round_seconds": float(np.median(times[1:])) if len(times) > 1 else times[0],
        "round_bytes": float(np.median(sizes)),
        "instructions": float(np.median(instructions)),
        "gram_seconds": min(gram),
        "gram_bound_seconds": m * (m + 1) * p / (2 * n**3 / min(mm)),
        "peak_rss_mb": peak_rss_mb(),
    }


def _wal(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def fresh(m: int, rounds: int, policy: str) -> dict:
    """coordinator_times in a new process: its peak memory is this M's alone."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(coordinator_times, m, rounds, policy).result()


def job(models: int, k: int, epochs: int, policy: str, root: Path) -> dict:
    """A real job through the driver, then a filtered history query on it from the CLI.
    policy "default": the built-in defaults (gravity, every member on all the data);
    "threshold": PLAIN."""
    from ensemble.config import load_config
    from ensemble.runtime.driver import run_job

    cfg = load_config(
        None,
        [
            *(PLAIN if policy == "threshold" else []),
            f"models.count={models}",
            f"resources.models_per_worker={k}",
            f"train.epochs={epochs}",
            f"job=scale-{models}-{policy}",
        ],
    )
    run_dir = root / f"job{models}-{policy}"
    t0 = time.perf_counter()
    s = run_job(cfg, run_dir)
    wall = time.perf_counter() - t0
    q = [sys.executable, "-m", "ensemble", "history", str(run_dir), "--model", "7"]
    t0 = time.perf_counter()
    subprocess.run([*q, "--limit", "20"], check=True, capture_output=True)
    query = time.perf_counter() - t0
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    return {
        "summary": s,
        "wall": wall,
        "query_seconds": query,
        "history_mb": (run_dir / "history.sqlite").stat().st_size / 1e6,
        "run_dir_mb": sum(f.stat().st_size for f in files) / 1e6,
        "files": len(files),
    }


def run(size: str) -> tuple[list[dict], list[str], dict]:
    cfg = SIZES[size]
    cases, notes = [], []
    # the one-core round times first: a job's Ray processes take a while to wind down
    for policy in POLICIES:
        grid = {m: fresh(m, cfg["rounds"], policy) for m in cfg["grid"]}
        ms = np.array(list(grid))
        for key, what in (("round_seconds", "later rounds"), ("first_round_seconds", "first")):
            rt = np.array([grid[m][key] for m in ms])
            slope = float(np.polyfit(np.log(ms), np.log(rt), 1)[0])
            target = ("<=", 2.0) if key == "round_seconds" and ms[-1] >= 4096 else None
            cases.append(
                case(
                    f"{policy}: exponent of round time in M, {what} ({ms[0]}..{ms[-1]})",
                    "slope",
                    [slope],
                    target,
                )
            )
        for m in ms:
            g = grid[m]
            cases.append(
                case(
                    f"{policy}: round time at M={m} (s, one core)",
                    "seconds",
                    [g["round_seconds"]],
                    ("<=", 0.1) if m == 1024 else None,
                    **g,
                    gram_share_of_first_round=g["gram_seconds"] / g["first_round_seconds"],
                    gram_over_bound=g["gram_seconds"] / g["gram_bound_seconds"],
                )
            )
        big = grid[ms[-1]]
        if ms[-1] >= 4096:
            cases.append(
                case(
                    f"{policy}: coordinator peak RSS at M={ms[-1]} (MB)",
                    "MB",
                    [big["peak_rss_mb"]],
                    ("<=", 2048.0),
                )
            )
    with tempfile.TemporaryDirectory() as tmp:
        for models, k, policy in cfg["jobs"]:
            j = job(models, k, cfg["epochs"], policy, Path(tmp))
            s = j["summary"]
            what = f"the {models}-model job ({policy})"
            cases.append(
                case(
                    f"a {models}-model job in stacked workers of {k}, {policy} policy",
                    "completed models / asked",
                    [len(s["members"]) / models],
                    (">=", 1.0),
                    wall_seconds=j["wall"],
                    job_seconds=s["wall_seconds"],
                    coordinator_peak_rss_mb=s["coordinator_peak_rss_mb"],
                    rounds=s["rounds"],
                    merges=s["merges"],
                    drifts=s["drifts"],
                    ensemble=s["ensemble"],
                    run_dir_mb=j["run_dir_mb"],
                    run_dir_files=j["files"],
                )
            )
            cases.append(
                case(
                    f"history.sqlite of {what} (MB)",
                    "MB",
                    [j["history_mb"]],
                    ("<=", 500.0),
                )
            )
            cases.append(
                case(
                    f"coordinator peak RSS in {what} (MB)",
                    "MB",
                    [s["coordinator_peak_rss_mb"]],
                    ("<=", 2048.0) if models >= 4096 else None,
                )
            )
            cases.append(
                case(
                    f"`ensemble history --model 7` on {what} (s, a process)",
                    "seconds",
                    [j["query_seconds"]],
                    ("<=", 1.0),
                )
            )
    notes.append(
        "Round = compat of 3 seed-dtnn layers from the bank's Gram, the policy, the SQLite "
        "transaction with the round's compat matrices (one float32 upper triangle per layer) "
        "and instructions, and the new tether generations (one file a round). Later rounds "
        "recompute only the Gram rows the previous round changed: under the threshold "
        "policy a fraction of them, under FedAvg all. gram_over_bound: a full Gram of the "
        "three layers against M (M + 1) P multiply-adds at this machine's one-core float32 "
        "matmul rate (n=1024) measured in the same process."
    )
    return cases, notes, cfg
