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
        # a future completes by callback: checking it costs nothing, unlike ray.wait
        self.calls[ref] = (method, args, ref.future())
        self.blocked += time.perf_counter() - t
        return ref

    def ready(self, ref) -> bool:
        return self.calls[ref][2].done()

    def get(self, ref):
        t = time.perf_counter()
        method, args, _ = self.calls.pop(ref)
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


def pick_device(setting: str) -> str:
    """auto: CUDA when Ray gave this actor a GPU (and torch sees one), else CPU."""
    if setting == "auto":
        return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    return setting


@ray.remote
class Worker:
    """Trains its models: one with a Trainer, k > 1 as one stacked computation."""

    def __init__(
        self,
        models: list[int],
        cfg: dict,
        data: Dataset,
        coordinator,
        run_dir: str,
        resumed: bool = False,
    ):
        config = Config.model_validate(cfg)
        # one thread per CPU given: more than that thrash (two threads on two cores do)
        torch.set_num_threads(max(1, int(config.resources.num_cpus_per_worker or 1)))
        self.device = pick_device(config.resources.device)
        ckpt = Path(run_dir) / "checkpoints"
        if len(models) == 1:
            self.trainer = Trainer(models[0], config, data, ckpt, resumed, device=self.device)
        else:
            from ensemble.stacked import StackedTrainer

            self.trainer = StackedTrainer(
                models, config, data, device=self.device, checkpoint_dir=ckpt, resumed=resumed
            )
        self.link = RayLink(coordinator, config.faults.call_retries)

    def run(self) -> list[MemberResult]:
        out = self.trainer.run(self.link)
        return out if isinstance(out, list) else [out]

    def where(self) -> dict:
        """Where this worker runs: node, process, GPUs and device."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "device": self.device,
        }
