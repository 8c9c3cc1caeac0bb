"""A worker's checkpoint: its stack's parameters and tethers, Adam, step, epoch, streams.

Written atomically (temp file + rename), read with torch.load(weights_only=True): only
tensors and plain values, never arbitrary pickles. `Checkpoints` keeps a stack's file and
its snapshot at the epoch's start, which a poisoned model rolls back to.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ensemble.training.stack import Stack

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's per-parameter state, elementwise


def stack_path(directory: Path, ids: list[int]) -> Path:
    """The checkpoint file of the stack of models `ids`."""
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:10]
    return Path(directory) / f"stack_{ids[0]}x{len(ids)}_{digest}.pt"


def save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # serialised in memory, then one write: faster than into the file
    torch.save(state, buf)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getbuffer())
    os.replace(tmp, path)  # a reader sees the old checkpoint or the new one, never half


def load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True, map_location="cpu")


def stack_state(stack: Stack, opt: torch.optim.Optimizer, copy: bool = False) -> dict:
    """The stack's training state: parameters, tethers and Adam's moments (views, or
    copies with copy=True)."""
    c = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())  # noqa: E731
    rows = {key: c(v) for key, v in stack.rows(slice(None)).items()}
    moments = {
        name: {key: c(st[key]) for key in MOMENTS if key in st}
        for name, p in stack.params.items()
        if (st := opt.state.get(p))
    }
    return {"rows": rows, "moments": moments}


@torch.no_grad()
def restore_row(stack: Stack, opt: torch.optim.Optimizer, i: int, state: dict) -> None:
    """Model i's slices of parameters, tethers and Adam moments from `state` (moments
    it lacks were not there yet: Adam had not stepped, so they are zero)."""
    stack.set_rows(i, {key: v[i] for key, v in state["rows"].items()})
    for name, p in stack.params.items():
        st = opt.state.get(p, {})
        for key in MOMENTS:
            if key in st:
                saved = state["moments"].get(name, {}).get(key)
                st[key][i] = 0.0 if saved is None else saved[i]


class Checkpoints:
    """A stack's checkpoint file (path None: none) and its rollback snapshot."""

    def __init__(self, stack: Stack, opt: torch.optim.Optimizer, path: Path | None, every: float):
        """every: seconds at least between two checkpoints written."""
        self.stack, self.opt, self.path, self.every = stack, opt, path, every
        self.saved_at = -math.inf  # when the last checkpoint was written (monotonic)
        self.snapshot: dict | None = None  # the stack at this epoch's start (rollback)

    def state(self, copy: bool = False) -> dict:
        return stack_state(self.stack, self.opt, copy)

    def take_snapshot(self) -> None:
        self.snapshot = self.state(copy=True)

    def roll_back(self, i: int) -> None:
        """Model i's slices back to the snapshot."""
        restore_row(self.stack, self.opt, i, self.snapshot)

    def save(self, progress: Callable[[], dict]) -> bool:
        """Write the stack, Adam and `progress()` (the trainer's step, epoch, streams...),
        once `every` seconds have passed since the last; -> whether it wrote."""
        now = time.monotonic()
        if self.path is None or now - self.saved_at < self.every:
            return False
        self.saved_at = now
        rows = self.state()["rows"]
        save(self.path, {"rows": rows, "opt": self.opt.state_dict(), **progress()})
        return True

    def load(self) -> dict | None:
        """Restore the stack and Adam from the file; -> the rest it holds (the trainer's
        progress), None where there is no checkpoint."""
        state = load(self.path) if self.path is not None else None
        if state is None:
            return None
        self.stack.set_rows(slice(None), state.pop("rows"))
        self.opt.load_state_dict(state.pop("opt"))
        return state
