"""The coordinator as a named Ray actor, and how other processes find and ask it.

The actor is a thin asynchronous shell around `coordination.coordinator.Coordinator`: workers'
calls run one at a time on its event loop. In sync mode an exchange waits (without blocking
the loop) until every model still training has reported up to its step, and the round of
that boundary has run. Queries run in their own thread against a read-only connection
(SQLite WAL), so reading never stalls a round.
"""

from __future__ import annotations

import asyncio
import math

import ray

from ensemble.errors import EnsembleError, RunDirError
from ensemble.history import QUERIES, HistoryReader
from ensemble.protocol import JoinRequest, Reply, StackReport
from ensemble.runtime.job import Prepared, open_coordinator

NAMESPACE = "tether-ensemble"


@ray.remote(concurrency_groups={"query": 1})
class CoordinatorActor:
    def __init__(self, prep: Prepared, run_dir: str):
        self.c = open_coordinator(prep, run_dir)
        self.sync = prep.cfg.coordinator.mode == "sync"
        self.closed = -math.inf  # the last boundary whose round has run (sync mode)
        self.changed: asyncio.Condition | None = None
        self._reader = None

    async def join(self, request: JoinRequest) -> Reply:
        return self.c.join(request)

    async def exchange(self, report: StackReport) -> Reply:
        c = self.c
        if not self.sync:
            return c.exchange(report)
        c.receive(report)
        await self.advance()
        async with self._condition():
            await self.changed.wait_for(
                lambda: self.closed >= report.step or not c.active[report.models].any()
            )
        return c.take_mail(report.models)

    async def advance(self) -> None:
        """Close every boundary that all models still training have reached: run the round
        due there, then let the exchanges waiting on it through."""
        frontier = self.c.frontier()
        if frontier <= self.closed:
            return
        self.c.close_boundary()
        self.closed = frontier
        async with self._condition():
            self.changed.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:  # made on the actor's own event loop
            self.changed = asyncio.Condition()
        return self.changed

    async def fail(self, models: list[int], detail: dict) -> None:
        """The driver: these models' worker is gone for good."""
        self.c.fail(models, detail)
        await self.advance()

    async def record_event(self, kind: str, model: int | None, step: int | None, detail: dict):
        self.c.history.event(kind, model, step, **detail)

    async def progress(self) -> dict:
        return self.c.progress()

    async def close(self) -> None:
        self.c.history.close()

    @ray.method(concurrency_group="query")
    def query(self, name: str, *args, **kwargs):
        if name not in QUERIES:
            raise ValueError(f"unknown query {name!r}; choose one of {sorted(QUERIES)}")
        if self._reader is None:
            self._reader = HistoryReader(self.c.history.path)
        return getattr(self._reader, name)(*args, **kwargs)

    @ray.method(concurrency_group="query")
    def status(self) -> dict:
        return {"job": self.c.job, "run_dir": str(self.c.history.run_dir), **self.c.progress()}


class LiveHistory:
    """Forwards each query to the running coordinator actor of a job."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str):
        if name not in QUERIES:
            raise AttributeError(name)
        return lambda *args, **kwargs: unwrap(
            lambda: ray.get(self.actor.query.remote(name, *args, **kwargs))
        )

    def close(self):
        pass


def unwrap(call):
    """Run `call`; re-raise a user error raised inside an actor as itself, not wrapped."""
    try:
        return call()
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        while cause is not None and not isinstance(cause, EnsembleError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, EnsembleError):
            raise cause from None
        raise


def reachable(address: str) -> None:
    """Fail fast, with a clear message, when nothing answers at host:port ('auto' and
    ray:// addresses are left to Ray)."""
    from ensemble.runtime.cluster import answers

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    if not answers(host or "127.0.0.1", int(port), timeout=1.0):
        raise EnsembleError(f"cannot reach a Ray cluster at {address}: nothing answers there")


def connect(address: str) -> None:
    """Join the cluster at `address` as a client of its jobs (idempotent)."""
    from ensemble.runtime.cluster import client_auth, held_stderr, refused_auth

    if ray.is_initialized():
        return
    reachable(address)
    authed = client_auth()
    with held_stderr() as ray_lines:  # a refused token: one line, not Ray's 20 retries
        try:
            ray.init(
                address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            why = refused_auth(address, ray_lines(), authed)
            raise why or EnsembleError(f"cannot reach a Ray cluster at {address}: {e}") from None


def find_coordinator(address: str, job: str):
    connect(address)
    try:
        return ray.get_actor(job, namespace=NAMESPACE)
    except ValueError:
        raise RunDirError(
            f"no running job {job!r} at {address}; a finished job's history is in its run "
            f"directory: ensemble history runs/{job}"
        ) from None


def list_jobs(address: str, timeout: float = 10.0) -> list[dict]:
    """Status of every running job's coordinator on the cluster."""
    connect(address)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and "/" not in a["name"]  # coordinators only
    ]
    out = []
    for name in sorted(names):
        try:
            out.append(
                ray.get(ray.get_actor(name, namespace=NAMESPACE).status.remote(), timeout=timeout)
            )
        except (ValueError, ray.exceptions.RayError) as e:
            out.append({"job": name, "error": type(e).__name__})
    return out


__all__ = ["NAMESPACE", "CoordinatorActor", "LiveHistory", "connect", "find_coordinator"]
