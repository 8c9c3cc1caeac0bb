"""The Ray worker actor: a thin shell around `ensemble.training.trainer.Trainer`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import torch

from ensemble.config import Config
from ensemble.protocol import JoinRequest, MemberResult, Reply, StackReport
from ensemble.runtime.job import Prepared, make_trainer
from ensemble.training.trainer import run_stack

RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class RayLink:
    """A trainer's link to the coordinator actor.

    Counts time spent waiting on it. A call that fails because the coordinator is down or
    restarting is sent again with exponential backoff (publications are idempotent by
    (model, step), and a restarted coordinator resyncs every model); after `retries` tries
    the error propagates and the worker fails.
    """

    def __init__(self, coordinator, retries: int = 10):
        self.c = coordinator
        self.retries = retries
        self.blocked = 0.0

    def join(self, request: JoinRequest) -> Reply:
        return RayPending(self, "join", request).result()

    def send(self, report: StackReport) -> RayPending:
        return RayPending(self, "exchange", report)


class RayPending:
    def __init__(self, link: RayLink, method: str, message):
        self.link, self.method, self.message = link, method, message
        t = time.perf_counter()
        self.ref = getattr(link.c, method).remote(message)
        self.future = self.ref.future()  # completes by callback: checking it costs nothing
        link.blocked += time.perf_counter() - t

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> Reply:
        t = time.perf_counter()
        try:
            for attempt in range(self.link.retries + 1):
                try:
                    return ray.get(self.ref)
                except RETRYABLE:
                    if attempt == self.link.retries:
                        raise
                    time.sleep(min(0.1 * 2**attempt, 5.0))
                    self.ref = getattr(self.link.c, self.method).remote(self.message)
        finally:
            self.link.blocked += time.perf_counter() - t


def pick_device(setting: str) -> str:
    """auto: CUDA when Ray gave this actor a GPU (and torch sees one), else CPU."""
    if setting == "auto":
        return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    return setting


@ray.remote
class Worker:
    """Trains its models as one stack and exchanges with the coordinator."""

    def __init__(self, models: list[int], prep: Prepared, coordinator, run_dir: str, resumed: bool):
        cfg: Config = prep.cfg
        # one thread per CPU given: more than that thrash (two threads on two cores do)
        torch.set_num_threads(max(1, int(cfg.resources.num_cpus_per_worker or 1)))
        self.device = pick_device(cfg.resources.device)
        ckpt = Path(run_dir) / "checkpoints"
        self.trainer = make_trainer(prep, models, self.device, ckpt, resumed)
        self.link = RayLink(coordinator, cfg.faults.call_retries)
        self.sync = cfg.coordinator.mode == "sync"

    def run(self) -> list[MemberResult]:
        return run_stack(self.trainer, self.link, self.sync, self.where())

    def where(self) -> dict:
        """Where this worker runs: node, process, GPUs and device."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "device": self.device,
        }
