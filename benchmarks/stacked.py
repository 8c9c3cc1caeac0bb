"""Stacked workers: model-steps per second of one actor training k models as one stacked
computation, against one model per actor, and against a bare stacked loop with no Ray.

- k=8: a job of 8 models as 8 single-model actors vs the same job as one 8-model actor
  (target >= 3x);
- k=64: one 64-model actor vs single-model actors (8 of them: 64 single actors do not fit
  in this machine's memory, so the per-model throughput of 8 stands in; target >= 5x);
- the bare limit: one stacked 8-model actor in a job vs the same StackedTrainer stepping in
  this process with no Ray and no coordinator (target >= 0.8x).

Throughput counts training time only (each member's train_seconds: from its first step to
its test predictions), not Ray start-up. Runs alternate within each repeat.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import PLAIN, case, ratios

SIZES = {
    "tiny": {"repeats": 1, "epochs": 1, "k_big": 8},
    "default": {"repeats": 3, "epochs": 10, "k_big": 64},
    "full": {"repeats": 5, "epochs": 20, "k_big": 64},
}


def job_rate(count: int, k: int, epochs: int, root: Path, tag: str) -> float:
    """Model-steps per second of a real job: all steps over the slowest worker's time."""
    from ensemble.config import load_config
    from ensemble.driver import run_job

    cfg = load_config(
        None,
        [
            *PLAIN,
            f"models.count={count}",
            f"resources.models_per_worker={k}",
            f"train.epochs={epochs}",
            f"job={tag}",
        ],
    )
    s = run_job(cfg, root / tag)
    return sum(m["steps"] for m in s["members"]) / max(m["train_seconds"] for m in s["members"])


def bare_rate(count: int, epochs: int) -> float:
    """The same stacked models stepping in this process: no Ray, no coordinator."""
    import torch

    from ensemble.config import load_config
    from ensemble.data import load_dataset
    from ensemble.stacked import StackedTrainer

    cfg = load_config(None, [*PLAIN, f"models.count={count}", f"train.epochs={epochs}"])
    data = load_dataset(cfg.data, cfg.seed)
    t = StackedTrainer(list(range(count)), cfg, data, device="cpu")
    torch.set_num_threads(1)
    steps = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in t.batches():
            t.train_step(*batch)
            steps += count
    return steps / (time.perf_counter() - t0)


def run(size: str) -> tuple[list[dict], list[str], dict]:
    cfg = SIZES[size]
    e, kb = cfg["epochs"], cfg["k_big"]
    single, stack8, stack_big, ray8, bare8 = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(cfg["repeats"]):
            single.append(job_rate(8, 1, e, root, f"single-{r}"))
            stack8.append(job_rate(8, 8, e, root, f"stack8-{r}"))
            stack_big.append(job_rate(kb, kb, e, root, f"big-{r}"))
            bare8.append(bare_rate(8, e))
            ray8.append(stack8[-1])
    cases = [
        case(
            "k=8: one 8-model actor vs 8 single-model actors (8 models)",
            "model-steps/s stacked / single",
            ratios(stack8, single),
            (">=", 3.0),
            stacked=stack8,
            single=single,
        ),
        case(
            f"k={kb}: one {kb}-model actor vs single-model actors (8 of them)",
            "model-steps/s stacked / single",
            ratios(stack_big, single),
            (">=", 5.0),
            stacked=stack_big,
            single=single,
        ),
        case(
            "k=8 stacked actor in a job vs the bare stacked loop (no Ray)",
            "model-steps/s job / bare",
            ratios(ray8, bare8),
            (">=", 0.8),
            job=ray8,
            bare=bare8,
        ),
    ]
    notes = [
        f"digits, default model (64-64), batch 32, {e} epochs; model-steps/s = all "
        "members' steps / the slowest member's training seconds. On 2 cores, 8 "
        "single-model actors share 2 CPUs."
    ]
    return cases, notes, cfg
