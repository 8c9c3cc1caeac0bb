"""Ray processes of ours, found and stopped: nothing left behind.

Every Ray instance this project starts (`ensemble cluster start`, or the private instance
of `ensemble run`) is started with an environment variable `TETHER_ENSEMBLE_RAY=<tag>`,
which the processes Ray starts inherit. Some of them (the dashboard and runtime-env agents,
the dashboard's module workers) are started with an environment of Ray's own; they are
the descendants of a marked process. So "ours" is every marked process and every
descendant of one, computed before anything is killed (a killed parent orphans its
children). A process is identified by (pid, start time), so a recycled pid is never hit.

`python -m ensemble.runtime.procs reap PID TAG` is the reaper a driver starts beside its private
instance: it keeps the list of the instance's processes up to date while the driver lives,
and when the driver dies (SIGKILL included) it stops them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MARKER = "TETHER_ENSEMBLE_RAY"

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _scan() -> dict[int, tuple[int, int, bytes]]:
    """pid -> (parent pid, start time, environment) of every process we can read."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
            env = (p / "environ").read_bytes()
        except OSError:
            continue
        if stat[0] != "Z":  # a zombie is already dead
            out[int(p.name)] = (int(stat[1]), int(stat[19]), env)
    return out


def ours(tag: str) -> set[Proc]:
    """Every live process started with MARKER=tag, and every descendant of one."""
    table = _scan()
    mark = f"{MARKER}={tag}".encode()
    me = os.getpid()
    found = {pid for pid, (_, _, env) in table.items() if mark in env.split(b"\0")}
    found.discard(me)
    while True:
        kids = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found - {me}
        if not kids:
            break
        found |= kids
    return {(pid, table[pid][1]) for pid in found}


def alive(procs: set[Proc]) -> set[Proc]:
    """Those of `procs` still running (the same process: same pid and start time)."""
    table = _scan()
    return {(pid, start) for pid, start in procs if pid in table and table[pid][1] == start}


def terminate(procs: set[Proc], timeout: float = 10.0) -> set[Proc]:
    """SIGTERM, then SIGKILL what is left after `timeout`; returns any still running."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid, _ in alive(procs):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + wait
        while alive(procs) and time.time() < deadline:
            time.sleep(0.1)
        if not alive(procs):
            return set()
    return alive(procs)


def start_reaper(tag: str) -> subprocess.Popen:
    """A process that stops the instance tagged `tag` once this process has died."""
    return subprocess.Popen(
        [sys.executable, "-m", "ensemble.runtime.procs", "reap", str(os.getpid()), tag],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the driver's group does not reach it
    )


def reap(driver: int, tag: str, every: float = 0.5) -> None:
    """Watch `driver`; remember the tagged instance's processes; stop them when it dies
    (a zombie is dead: where nothing reaps it, it lingers in the process table)."""
    me = {p for p in _all() if p[0] == driver}
    seen: set[Proc] = set()
    while alive(me):
        seen = alive(seen) | ours(tag)
        time.sleep(every)
    terminate(seen | ours(tag), timeout=3.0)


def _all() -> set[Proc]:
    return {(pid, start) for pid, (_, start, _) in _scan().items()}


if __name__ == "__main__":  # python -m ensemble.runtime.procs reap PID TAG
    if len(sys.argv) != 4 or sys.argv[1] != "reap":
        sys.exit("usage: python -m ensemble.runtime.procs reap DRIVER_PID TAG")
    reap(int(sys.argv[2]), sys.argv[3])
