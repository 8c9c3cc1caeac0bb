"""Coordination overhead: the same job with coordination on and off, via run_job.

On: the default config (plateau trigger, threshold policy). Off: policy.name=none (workers
still publish and poll; the coordinator computes nothing and decides nothing). Same data,
M, sizes, seeds and steps. Pairs of runs alternate on/off (then off/on), each run on its own
fresh local Ray instance, started and stopped by run_job.

Also the same pairs in one process without Ray (trainers interleaved, coordinator called
directly): the CPU cost of coordination when nothing can overlap it.

Two walls per Ray run: end-to-end (the run_job call: Ray start, actors, training, summary,
Ray stop) and the job's own `wall_seconds` (from just after Ray has started to the
summary). Their difference is the Ray start/stop share.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import PLAIN, case, local_ray, ratios, spread

SIZES = {
    "tiny": {"repeats": 1, "set": ["models.count=2", "model.layers=[16, 16]", "train.epochs=1"]},
    "default": {"repeats": 3, "set": []},  # the default job: 8 models, digits, 20 epochs
    "full": {"repeats": 5, "set": []},
}


def one_run(overrides: list[str], job: str, root: Path) -> dict:
    from ensemble.config import load_config
    from ensemble.driver import run_job

    cfg = load_config(None, [*PLAIN, *overrides, f"job={job}"])
    t = time.perf_counter()
    summary = run_job(cfg, root / job)
    total = time.perf_counter() - t
    members = summary["members"]
    return {
        "total": total,
        "job": summary["wall_seconds"],
        "blocked": statistics.median(m["blocked_fraction"] for m in members),
        "blocked_max": max(m["blocked_fraction"] for m in members),
        "steps": [m["steps"] for m in members],
        "merges": summary["merges"],
        "drifts": summary["drifts"],
        "publications": summary["publications"],
        "ensemble": summary["ensemble"],
    }


def one_in_process(overrides: list[str], job: str, root: Path) -> float:
    """The same job in this process (ensemble.job.run_local, no Ray): seconds."""
    from ensemble.config import load_config
    from ensemble.job import run_local

    cfg = load_config(None, [*PLAIN, *overrides, f"job={job}"])
    t = time.perf_counter()
    run_local(cfg, root / job)
    return time.perf_counter() - t


def run(size: str) -> tuple[list[dict], list[str], dict]:
    local_ray()
    cfg = SIZES[size]
    modes = {"on": cfg["set"], "off": [*cfg["set"], "policy.name=none"]}
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    local: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        one_in_process(SIZES["tiny"]["set"], "local-warmup", Path(tmp))  # imports, caches
        for r in range(cfg["repeats"]):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                local[mode].append(one_in_process(modes[mode], f"local-{mode}-{r}", Path(tmp)))
        if size != "tiny":  # the first Ray instance of a process starts cold: discard it
            one_run(SIZES["tiny"]["set"], "overhead-warmup", Path(tmp))
        for r in range(cfg["repeats"]):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                runs[mode].append(one_run(modes[mode], f"overhead-{mode}-{r}", Path(tmp)))
    on, off = runs["on"], runs["off"]
    assert all(a["steps"] == b["steps"] for a, b in zip(on, off, strict=True)), "steps differ"

    def col(rs, k):
        return [x[k] for x in rs]

    startup = [1 - x["job"] / x["total"] for x in on + off]
    cases = [
        case(
            "job wall, excl. Ray start/stop",
            "coordination on / off (wall)",
            ratios(col(on, "job"), col(off, "job")),
            ("<=", 1.05),
            on_seconds=spread(col(on, "job")),
            off_seconds=spread(col(off, "job")),
        ),
        case(
            "end-to-end run_job",
            "coordination on / off (wall)",
            ratios(col(on, "total"), col(off, "total")),
            ("<=", 1.05),
            on_seconds=spread(col(on, "total")),
            off_seconds=spread(col(off, "total")),
        ),
        case(
            "same job in one process, no Ray",
            "coordination on / off (wall)",
            ratios(local["on"], local["off"]),
            on_seconds=spread(local["on"]),
            off_seconds=spread(local["off"]),
        ),
        case(
            "worker time blocked on Ray, on",
            "blocked / train time (median member)",
            col(on, "blocked"),
            max_member=spread(col(on, "blocked_max")),
        ),
        case(
            "worker time blocked on Ray, off",
            "blocked / train time (median member)",
            col(off, "blocked"),
            max_member=spread(col(off, "blocked_max")),
        ),
        case("Ray start/stop share", "(end-to-end - job wall) / end-to-end", startup),
    ]
    notes = [
        "Each run starts its own local Ray instance (loopback, auth off) via run_job. "
        "Except at --tiny, a tiny job runs first and is discarded (cold start).",
        "No-Ray case: the whole job in one process (ensemble.job.run_local): all "
        "coordination work is on the critical path, none overlaps training on a spare core. "
        "It shows the CPU cost of coordination; the <= 1.05 target is for the Ray job.",
        "Blocked fraction: a worker's time inside Ray calls to the coordinator (submit, "
        "non-blocking wait, get) over its training time; median over members per run.",
        f"Per run (on): merges {col(on, 'merges')}, drifts {col(on, 'drifts')}, "
        f"publications {col(on, 'publications')}; (off): publications "
        f"{col(off, 'publications')}.",
        "Ensemble test accuracy on "
        f"{[round(x['ensemble']['accuracy'], 4) for x in on]}, off "
        f"{[round(x['ensemble']['accuracy'], 4) for x in off]}.",
    ]
    from ensemble.config import load_config

    base = load_config(None, [*PLAIN, *cfg["set"]])
    params = {
        "repeats": cfg["repeats"],
        "overrides": modes,
        "models": base.models.count,
        "epochs": base.train.epochs,
        "trigger": base.trigger.name,
        "policy_on": base.policy.name,
        "steps_per_member": on[0]["steps"],
    }
    return cases, notes, params
