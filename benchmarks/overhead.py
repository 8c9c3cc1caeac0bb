"""Coordination overhead of the default job, and what the synchronous protocol costs.

Three runs of configs/default.yaml (8 models, digits, 20 epochs), each through run_job on
its own fresh local Ray instance:
- sync: as shipped (coordinator.mode sync: every exchange waits for the previous round);
- async: coordinator.mode async (workers never wait; rounds see whatever has arrived);
- off: policy.name none (workers still report; the coordinator decides nothing).
The order rotates every repeat. sync / async decides the default mode (issue: sync stays
the default unless it costs more than 10% wall time at M = 8); sync / off is what the
default policy costs.

Also sync and off in one process without Ray (ensemble.runtime.job.run_local): the CPU cost of
coordination when nothing can overlap it.

Two walls per Ray run: end-to-end (the run_job call: Ray start, actors, training, summary,
Ray stop) and the job's own `wall_seconds` (from just after Ray has started to the
summary). Their difference is the Ray start/stop share.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import case, local_ray, ratios, spread

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": {
        "repeats": 1,
        "set": ["models.count=2", "data.groups=2", "model.layers=[16, 16]", "train.epochs=1"],
    },
    "default": {"repeats": 3, "set": []},  # the default job: 8 models, digits, 20 epochs
    "full": {"repeats": 5, "set": []},
}
MODES = {
    "sync": ["coordinator.mode=sync"],
    "async": ["coordinator.mode=async"],
    "off": ["policy.name=none"],
}


def config(overrides: list[str], job: str):
    from ensemble.config import load_config

    return load_config(ROOT / "configs" / "default.yaml", [*overrides, f"job={job}"])


def one_run(overrides: list[str], job: str, root: Path) -> dict:
    from ensemble.runtime.driver import run_job

    t = time.perf_counter()
    summary = run_job(config(overrides, job), root / job)
    total = time.perf_counter() - t
    members = summary["members"]
    return {
        "total": total,
        "job": summary["wall_seconds"],
        "blocked": statistics.median(m["blocked_fraction"] for m in members),
        "steps": [m["steps"] for m in members],
        "merges": summary["merges"],
        "rounds": summary["rounds"],
        "ensemble": summary["ensemble"],
    }


def one_in_process(overrides: list[str], job: str, root: Path) -> float:
    """The same job in this process (ensemble.runtime.job.run_local, no Ray): seconds."""
    from ensemble.runtime.job import run_local

    t = time.perf_counter()
    run_local(config(overrides, job), root / job)
    return time.perf_counter() - t


def run(size: str) -> tuple[list[dict], list[str], dict]:
    local_ray()
    cfg = SIZES[size]
    modes = {name: [*cfg["set"], *extra] for name, extra in MODES.items()}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    local: dict[str, list[float]] = {"sync": [], "off": []}
    order = list(modes)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        one_in_process(SIZES["tiny"]["set"], "local-warmup", Path(tmp))  # imports, caches
        for r in range(cfg["repeats"]):
            for mode in local if r % 2 == 0 else reversed(list(local)):
                local[mode].append(one_in_process(modes[mode], f"local-{mode}-{r}", Path(tmp)))
        if size != "tiny":  # the first Ray instance of a process starts cold: discard it
            one_run(SIZES["tiny"]["set"], "overhead-warmup", Path(tmp))
        for r in range(cfg["repeats"]):
            for mode in order[r % 3 :] + order[: r % 3]:
                runs[mode].append(one_run(modes[mode], f"overhead-{mode}-{r}", Path(tmp)))
    assert len({tuple(x["steps"]) for rs in runs.values() for x in rs}) == 1, "steps differ"

    def col(mode, k):
        return [x[k] for x in runs[mode]]

    cases = [
        case(
            "default job wall, excl. Ray start/stop: sync / async",
            "sync / async (wall)",
            ratios(col("sync", "job"), col("async", "job")),
            ("<=", 1.10),
            sync_seconds=spread(col("sync", "job")),
            async_seconds=spread(col("async", "job")),
        ),
        case(
            "default job wall, excl. Ray start/stop: coordination on (sync) / off",
            "on / off (wall)",
            ratios(col("sync", "job"), col("off", "job")),
            ("<=", 1.05),
            on_seconds=spread(col("sync", "job")),
            off_seconds=spread(col("off", "job")),
        ),
        case(
            "end-to-end run_job: coordination on (sync) / off",
            "on / off (wall)",
            ratios(col("sync", "total"), col("off", "total")),
            on_seconds=spread(col("sync", "total")),
            off_seconds=spread(col("off", "total")),
        ),
        case(
            "same job in one process, no Ray: on / off",
            "on / off (wall)",
            ratios(local["sync"], local["off"]),
            on_seconds=spread(local["sync"]),
            off_seconds=spread(local["off"]),
        ),
    ]
    cases += [
        case(
            f"worker time blocked on the coordinator, {mode}",
            "blocked / train time",
            col(mode, "blocked"),
        )
        for mode in modes
    ]
    startup = [1 - x["job"] / x["total"] for rs in runs.values() for x in rs]
    cases.append(case("Ray start/stop share", "(end-to-end - job wall) / end-to-end", startup))
    notes = [
        "Each run starts its own local Ray instance (loopback, auth off) via run_job. "
        "Except at --tiny, a tiny job runs first and is discarded (cold start).",
        "No-Ray case: the whole job in one process (ensemble.runtime.job.run_local): all "
        "coordination work is on the critical path, none overlaps training.",
        "Blocked fraction: a worker's time waiting on the coordinator over its training "
        "time; median over members per run.",
        *(
            f"{mode}: rounds {col(mode, 'rounds')}, merges {col(mode, 'merges')}, ensemble "
            f"test NLL {[round(x['ensemble']['nll'], 4) for x in runs[mode]]}, accuracy "
            f"{[round(x['ensemble']['accuracy'], 4) for x in runs[mode]]}"
            for mode in modes
        ),
    ]
    params = {"repeats": cfg["repeats"], "overrides": modes, "steps": runs["off"][0]["steps"]}
    return cases, notes, params
