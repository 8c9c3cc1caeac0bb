"""The Ray worker actor: a thin shell around `ensemble.training.Trainer`."""

from __future__ import annotations

import time

import ray
import torch

from ensemble.config import Config
from ensemble.data import Dataset
from ensemble.training import MemberResult, Trainer


class RayLink:
    """A Trainer's link to the coordinator actor; counts time spent blocked on Ray."""

    def __init__(self, coordinator):
        self.c = coordinator
        self.blocked = 0.0

    def call(self, method, *args):
        t = time.perf_counter()
        ref = getattr(self.c, method).remote(*args)
        self.blocked += time.perf_counter() - t
        return ref

    def ready(self, ref) -> bool:
        t = time.perf_counter()
        done, _ = ray.wait([ref], timeout=0)
        self.blocked += time.perf_counter() - t
        return bool(done)

    def get(self, ref):
        t = time.perf_counter()
        out = ray.get(ref)
        self.blocked += time.perf_counter() - t
        return out

    def tell(self, method, *args):
        t = time.perf_counter()
        getattr(self.c, method).remote(*args)
        self.blocked += time.perf_counter() - t


@ray.remote
class Worker:
    def __init__(self, model: int, cfg: dict, data: Dataset, coordinator):
        torch.set_num_threads(1)  # one thread per process: two on two cores thrash
        self.trainer = Trainer(model, Config.model_validate(cfg), data)
        self.link = RayLink(coordinator)

    def run(self) -> MemberResult:
        return self.trainer.run(self.link)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
