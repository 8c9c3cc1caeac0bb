"""A worker's checkpoint: its stack's parameters and tethers, Adam, step, epoch, streams.

Written atomically (temp file + rename), read with torch.load(weights_only=True): only
tensors and plain values, never arbitrary pickles.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch


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
