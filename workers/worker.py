"""The Ray worker actor: a thin shell around `ensemble.training.Trainer`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import torch

from ensemble.config import Config
from ensemble.data import Dataset
from ensemble.training import MemberResult, Trainer

RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class RayLink:
    """A Trainer's link to the coordinator actor.

    Counts time spent blocked on Ray. A call that fails because the coordinator is down or
    restarting is sent again with exponential backoff (publications are idempotent by
    (model, step), and a restarted coordinator resyncs every model); after `retries` tries
    the error propagates and the worker fails.
    """

    def __init__(self, coordinator, retries: int = 10):
        self.c = coordinator
        self.retries = retries
        self.blocked = 0.0
        self.calls: dict = {}  # ref -> (method, args), to send again

    def call(self, method, *args):
        t = time.perf_counter()
        ref = getattr(self.c, method).remote(*args)
        self.calls[ref] = (method, args)
        self.blocked += time.perf_counter() - t
        return ref

    def ready(self, ref) -> bool:
        t = time.perf_counter()
        done, _ = ray.wait([ref], timeout=0)
        self.blocked += time.perf_counter() - t
        return bool(done)

    def get(self, ref):
        t = time.perf_counter()
        method, args = self.calls.pop(ref)
        try:
            for attempt in range(self.retries + 1):
                try:
                    return ray.get(ref)
                except RETRYABLE:
                    if attempt == self.retries:
                        raise
                    time.sleep(min(0.1 * 2**attempt, 5.0))
                    ref = getattr(self.c, method).remote(*args)
        finally:
            self.blocked += time.perf_counter() - t


@ray.remote
class Worker:
    def __init__(
        self, model: int, cfg: dict, data: Dataset, coordinator, run_dir: str, resumed: bool = False
    ):
        torch.set_num_threads(1)  # one thread per process: two on two cores thrash
        config = Config.model_validate(cfg)
        self.trainer = Trainer(model, config, data, Path(run_dir) / "checkpoints", resumed)
        self.link = RayLink(coordinator, config.faults.call_retries)

    def run(self) -> MemberResult:
        return self.trainer.run(self.link)

    def where(self) -> tuple[str, int]:
        """(node id, process id): where this worker runs."""
        return ray.get_runtime_context().get_node_id(), os.getpid()
