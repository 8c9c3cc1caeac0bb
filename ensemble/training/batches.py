"""Which training rows each model sees, step by step.

Each model reads an endless stream of fresh shuffles of its own rows (all of the training
split, or its shard), drawn from its own generator; an epoch is the same number of steps
for every model, `steps_per_epoch`: one pass's worth over the whole training split, each
a full batch. So every partition trains for the same steps, models with shards of
different sizes step together (a model on a small shard cycles through it more often), and
no model's batch is ever empty or padded. With full data, an epoch is one pass (the last
batch tops up from the next shuffle).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def steps_per_epoch(train_rows: int, batch_size: int) -> int:
    """One pass's worth of full batches over the whole training split."""
    return max(1, math.ceil(train_rows / batch_size))


class Batches:
    """Per model, a stream of shuffles of its rows; `epoch()` gives the next epoch's rows."""

    def __init__(self, rows: list[np.ndarray], batch_size: int, steps: int, seeds: list[int]):
        if any(len(r) == 0 for r in rows):
            raise ValueError("a model has no training rows")
        self.rows = [torch.tensor(np.asarray(r), dtype=torch.int64) for r in rows]
        self.batch_size, self.steps = batch_size, steps
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.left = [torch.empty(0, dtype=torch.int64) for _ in rows]  # rest of a shuffle

    def epoch(self) -> torch.Tensor:
        """(k, steps * batch_size) row indices: model i's batch s is [i, s*B:(s+1)*B]."""
        need = self.steps * self.batch_size
        out = []
        for i, (rows, gen) in enumerate(zip(self.rows, self.gens, strict=True)):
            parts, have = [self.left[i]], len(self.left[i])
            while have < need:
                parts.append(rows[torch.randperm(len(rows), generator=gen)])
                have += len(rows)
            stream = torch.cat(parts)
            out.append(stream[:need])
            self.left[i] = stream[need:]
        return torch.stack(out)

    def state(self) -> dict:
        return {"gens": [g.get_state() for g in self.gens], "left": list(self.left)}

    def load(self, state: dict) -> None:
        for g, s in zip(self.gens, state["gens"], strict=True):
            g.set_state(s)
        self.left = [torch.as_tensor(t, dtype=torch.int64) for t in state["left"]]
