"""The coordinator as a named Ray actor, and how other processes find and ask it."""

from __future__ import annotations

import ray

from ensemble.coordinator import Coordinator
from ensemble.errors import EnsembleError, RunDirError
from ensemble.history import QUERIES, HistoryReader

NAMESPACE = "tether-ensemble"


@ray.remote(concurrency_groups={"query": 1})
class CoordinatorActor(Coordinator):
    """Publications and rounds run one at a time in the default group; queries run in their
    own thread against a read-only connection (SQLite WAL), so reading never stalls a round.
    """

    @ray.method(concurrency_group="query")
    def query(self, name: str, *args, **kwargs):
        if name not in QUERIES:
            raise ValueError(f"unknown query {name!r}; choose one of {sorted(QUERIES)}")
        if getattr(self, "_reader", None) is None:
            self._reader = HistoryReader(self.history.path)
        return getattr(self._reader, name)(*args, **kwargs)

    @ray.method(concurrency_group="query")
    def status(self) -> dict:
        return {"job": self.job, "run_dir": str(self.history.run_dir), **self.progress()}


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


def connect(address: str) -> None:
    """Join the cluster at `address` as a client of its jobs (idempotent)."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise EnsembleError(f"cannot reach a Ray cluster at {address}: {e}") from None


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
