"""Coordinator load: many concurrent publishers (no training) for a bounded time, on loopback.

Reports sustained publications per second and the latency of a publish call (the rounds
run inside those calls, so the tail is decision latency), two ways:
- one Ray call per model's publication (32 independent publishers);
- the protocol's own shape: each publisher actor sends one report for its whole stack of
  models per exchange, committed as one SQLite transaction (a group commit of k rows).
Beside them, the coordinator alone in this process, no Ray: its ceiling. The correctness
part, zero lost and zero duplicated records, is checked by tests/test_load.py with `drive`.
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

    def __init__(self, coordinator, models: list[int], shapes: dict, seed: int, stacked: bool):
        self.c, self.models, self.stacked = coordinator, models, stacked
        rng = np.random.default_rng(seed)
        self.tethers = {
            m: {k: rng.normal(1, 0.1, (1, *s)).astype(np.float32) for k, s in shapes.items()}
            for m in models
        }

    def run(self, seconds: float) -> dict:
        acked, latencies, step = [], [], dict.fromkeys(self.models, 0)
        inflight = {}  # ref -> (model, step, t0)
        start = time.perf_counter()
        deadline = start + seconds

        def send(ms):
            from ensemble.protocol import StackReport

            k = len(ms)
            for m in ms:
                step[m] += 1
            one, yes = np.ones(k), np.ones(k, dtype=bool)
            t = {n: np.concatenate([self.tethers[m][n] for m in ms]) for n in self.tethers[ms[0]]}
            report = StackReport(np.array(ms), step[ms[0]], 0, one, one, yes, yes, t)
            inflight[self.c.exchange.remote(report)] = (ms, step[ms[0]], time.perf_counter())

        groups = [self.models] if self.stacked else [[m] for m in self.models]
        for ms in groups:
            send(ms)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                ms, s, t0 = inflight.pop(ref)
                ray.get(ref)  # a reply: nothing to apply it to
                acked += [(m, s) for m in ms]
                latencies.append(time.perf_counter() - t0)
                if time.perf_counter() < deadline:
                    send(ms)
        return {"acked": acked, "latencies": latencies, "elapsed": time.perf_counter() - start}


def load_config_for(publishers: int):
    from ensemble.config import load_config

    return load_config(
        None,
        [
            *PLAIN,
            f"models.count={publishers}",
            "job=load",
            "model.layers=[16]",
            "coordinator.mode=async",  # free-running publishers, not lockstep workers
        ],
    )


def drive(
    run_dir: Path, publishers: int, actors: int, seconds: float, stacked: bool = False
) -> dict:
    """Start a coordinator for `publishers` models and hammer it. Needs ray.init first.
    stacked: each actor reports all its models in one call, as workers do."""
    from ensemble.runtime.job import prepare
    from ensemble.runtime.service import CoordinatorActor

    prep = prepare(load_config_for(publishers))
    shapes = prep.shapes
    coordinator = CoordinatorActor.remote(prep, str(run_dir))
    ray.get(coordinator.progress.remote())
    ids = np.array_split(np.arange(publishers), actors)
    pubs = [
        Publisher.remote(coordinator, [int(i) for i in chunk], shapes, k, stacked)
        for k, chunk in enumerate(ids)
    ]
    ray.get([p.__ray_ready__.remote() for p in pubs])  # started, tethers made
    outs = ray.get([p.run.remote(seconds) for p in pubs])
    wall = max(o["elapsed"] for o in outs)  # the publishers' own time, not their start
    progress = ray.get(coordinator.progress.remote())
    ray.get(coordinator.close.remote())
    acked = [a for o in outs for a in o["acked"]]
    lat = sorted(x for o in outs for x in o["latencies"])
    return {"acked": acked, "latencies": lat, "wall": wall, "rounds": progress["rounds"]}


def in_process(run_dir: Path, publishers: int, seconds: float) -> tuple[float, int]:
    """The coordinator alone, no Ray: publications a second when each is its own report
    (one SQLite transaction each), and the rounds it ran."""
    from ensemble.protocol import StackReport
    from ensemble.runtime.job import open_coordinator, prepare

    prep = prepare(load_config_for(publishers))
    c = open_coordinator(prep, str(run_dir))
    rng = np.random.default_rng(0)
    t = {
        m: {k: rng.normal(1, 0.1, (1, *s)).astype(np.float32) for k, s in prep.shapes.items()}
        for m in range(publishers)
    }
    one, yes = np.ones(1), np.ones(1, dtype=bool)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        m = n % publishers
        c.exchange(StackReport(np.array([m]), n // publishers + 1, 0, one, one, yes, yes, t[m]))
        n += 1
    wall = time.perf_counter() - t0
    rounds = c.rounds
    c.history.close()
    return n / wall, rounds


def run(size: str) -> tuple[list[dict], list[str], dict]:
    cfg = SIZES[size]
    outs = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for stacked in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                outs[stacked] = drive(Path(tmp), **cfg, stacked=stacked)
    finally:
        ray.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        alone, alone_rounds = in_process(Path(tmp), cfg["publishers"], cfg["seconds"] / 3)
    cases, notes = [], []
    for stacked, out in outs.items():
        how = "one report per actor's stack" if stacked else "one call per publication"
        lat = out["latencies"]
        rate = len(out["acked"]) / out["wall"]
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731, B023
        cases += [
            case(
                f"publications per second, {how} (sustained)",
                "publications / second",
                [rate],
                (">=", 5000.0),
            ),
            case(f"call latency p50 (s), {how}", "seconds", [p(0.5)]),
            case(f"call latency p99 (s), {how}, includes decision rounds", "seconds", [p(0.99)]),
        ]
        notes.append(
            f"{how}: {cfg['publishers']} publishers on {cfg['actors']} actors for "
            f"{cfg['seconds']} s: {len(out['acked'])} publications in {len(lat)} calls, "
            f"{out['rounds']} rounds, mean call latency {statistics.mean(lat):.4f} s."
        )
    cases.append(
        case(
            "publications per second, the coordinator alone in this process (no Ray)",
            "publications / second",
            [alone],
        )
    )
    notes.append(
        f"In process, one report per publication, each its own SQLite transaction (WAL, "
        f"synchronous=NORMAL): {alone:.0f}/s with {alone_rounds} rounds. What bounds the first "
        "row is Ray's cost per call on 2 cores shared by the publishers, the coordinator and "
        "Ray's own processes, not the commit; a stack's report carries its k publications "
        "in one call and one transaction."
    )
    return cases, notes, cfg
