"""A worker's checkpoint: model (tethers included), optimiser, step, epoch and RNG state.

Written atomically (temp file + rename), read with torch.load(weights_only=True): only
tensors and plain values, never arbitrary pickles.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def path_for(directory: Path, model: int) -> Path:
    return Path(directory) / f"model_{model}.pt"


def save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a reader sees the old checkpoint or the new one, never half


def load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True, map_location="cpu")


def save_training(path: Path, model, opt, step: int, epoch: int, **extra) -> None:
    """What every trainer checkpoints (model incl. tethers, optimiser, step, epoch), plus
    its own `extra` state (RNG, triggers, ...)."""
    save(
        path,
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "epoch": epoch,
            **extra,
        },
    )


def restore_training(path: Path | None, model, opt) -> dict | None:
    """Load model and optimiser from the checkpoint; return the whole state (for step,
    epoch and the trainer's extras), or None when there is none."""
    state = load(path) if path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    return state
