"""Where a job's wall time goes: named phases, measured as they pass (`summary.json`
`phases`, `ensemble run --verbose`)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager


def process_started() -> float:
    """When this process started (epoch seconds): its start time in /proc, else now."""
    try:
        ticks = int(open("/proc/self/stat").read().rpartition(")")[2].split()[19])
        boot = next(
            float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


class Phases:
    """Seconds per named phase, in the order they ran; a phase run twice adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)
