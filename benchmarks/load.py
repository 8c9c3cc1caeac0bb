"""Coordinator load: many concurrent publishers (no training) for a bounded time, on loopback.

Reports sustained publications per second and the latency of a publish call (the rounds
run inside those calls, so the tail is decision latency). The correctness part, zero lost
and zero duplicated records, is checked by tests/test_load.py with `drive` below.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from benchmarks.common import PLAIN, case

SIZES = {
    "tiny": {"publishers": 4, "actors": 2, "seconds": 2.0},
    "default": {"publishers": 32, "actors": 4, "seconds": 15.0},
    "full": {"publishers": 32, "actors": 4, "seconds": 60.0},
}


@ray.remote(num_cpus=0)
class Publisher:
    """Publishes for several model ids, one call in flight per model, until time is up."""

    def __init__(self, coordinator, models: list[int], shapes: dict, seed: int):
        self.c, self.models = coordinator, models
        rng = np.random.default_rng(seed)
        self.tethers = {
            m: {k: rng.normal(1, 0.1, (1, *s)).astype(np.float32) for k, s in shapes.items()}
            for m in models
        }

    def run(self, seconds: float) -> dict:
        acked, latencies, step = [], [], dict.fromkeys(self.models, 0)
        inflight = {}  # ref -> (model, step, t0)
        deadline = time.perf_counter() + seconds

        def send(m):
            from ensemble.protocol import StackReport

            step[m] += 1
            one, yes = np.ones(1), np.ones(1, dtype=bool)
            report = StackReport(np.array([m]), step[m], 0, one, one, yes, yes, self.tethers[m])
            inflight[self.c.exchange.remote(report)] = (m, step[m], time.perf_counter())

        for m in self.models:
            send(m)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                m, s, t0 = inflight.pop(ref)
                ray.get(ref)  # a reply: nothing to apply it to
                acked.append((m, s))
                latencies.append(time.perf_counter() - t0)
                if time.perf_counter() < deadline:
                    send(m)
        return {"acked": acked, "latencies": latencies}


def drive(run_dir: Path, publishers: int, actors: int, seconds: float) -> dict:
    """Start a coordinator for `publishers` models and hammer it. Needs ray.init first."""
    from ensemble.config import load_config
    from ensemble.job import prepare
    from ensemble.service import CoordinatorActor

    cfg = load_config(
        None,
        [
            *PLAIN,
            f"models.count={publishers}",
            "job=load",
            "model.layers=[16]",
            "coordinator.mode=async",  # free-running publishers, not lockstep workers
        ],
    )
    prep = prepare(cfg)
    shapes = prep.shapes
    coordinator = CoordinatorActor.remote(prep, str(run_dir))
    ray.get(coordinator.progress.remote())
    ids = np.array_split(np.arange(publishers), actors)
    pubs = [
        Publisher.remote(coordinator, [int(i) for i in chunk], shapes, k)
        for k, chunk in enumerate(ids)
    ]
    t0 = time.perf_counter()
    outs = ray.get([p.run.remote(seconds) for p in pubs])
    wall = time.perf_counter() - t0
    progress = ray.get(coordinator.progress.remote())
    ray.get(coordinator.close.remote())
    acked = [a for o in outs for a in o["acked"]]
    lat = sorted(x for o in outs for x in o["latencies"])
    return {"acked": acked, "latencies": lat, "wall": wall, "rounds": progress["rounds"]}


def run(size: str) -> tuple[list[dict], list[str], dict]:
    cfg = SIZES[size]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = drive(Path(tmp), **cfg)
    finally:
        ray.shutdown()
    lat = out["latencies"]
    rate = len(out["acked"]) / out["wall"]
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    cases = [
        case("publications per second (sustained)", "publications / second", [rate]),
        case("publish latency p50 (s)", "seconds", [p(0.5)]),
        case("publish latency p99 (s), includes decision rounds", "seconds", [p(0.99)]),
    ]
    notes = [
        f"{cfg['publishers']} publishers on {cfg['actors']} actors for "
        f"{cfg['seconds']} s: {len(out['acked'])} publications, {out['rounds']} rounds, "
        f"mean latency {statistics.mean(lat):.4f} s. Absolute numbers, no baseline: "
        "each publication commits one SQLite transaction on this machine's disk."
    ]
    return cases, notes, cfg
