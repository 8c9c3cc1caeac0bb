"""A stack's evaluation: its models' scores on the validation split (all of it, or each
model's own rows), the merge guard that undoes merges which raised them, and the fixed
probe batch's outputs and Grams that a policy compares."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ensemble.outputs.evaluation import score
from ensemble.training.stack import Stack


@torch.no_grad()
def evaluate(stack: Stack, x: torch.Tensor, y: torch.Tensor, probs: bool = False):
    """(k, 2) loss and accuracy (ensemble.outputs.evaluation.score) of every model on the
    shared x (N, ...), y (N,); with probs=True also their class probabilities (k, N, C)."""
    p = torch.softmax(stack.forward(x, shared=True), 2).float().cpu().numpy()
    s = score(p, y.cpu().numpy())
    scores = np.stack([s["nll"], s["accuracy"]], 1)
    return (scores, p) if probs else scores


class Validation:
    """The validation split and probe batch of a stack, on its device, and its scores there."""

    def __init__(
        self,
        stack: Stack,
        x_val: np.ndarray,
        y_val: np.ndarray,
        device: torch.device,
        val_rows: list[np.ndarray] | None = None,
        probe_size: int = 0,
    ):
        """val_rows: each model's own rows (indices into x_val), None: all of them;
        the probe batch is the first probe_size rows of x_val."""
        self.stack = stack
        as_t = lambda a: torch.tensor(np.asarray(a), device=device)  # noqa: E731
        self.x, self.y = as_t(x_val), as_t(y_val)
        self.probe = as_t(x_val[:probe_size])
        self.own_rows = None  # per model (index (k, V), mask (k, V)) when not all of x_val
        if val_rows is not None:
            longest = max(len(v) for v in val_rows)
            index = np.zeros((len(val_rows), longest), dtype=np.int64)
            mask = np.zeros((len(val_rows), longest), dtype=bool)
            for i, v in enumerate(val_rows):
                index[i, : len(v)], mask[i, : len(v)] = v, True
            self.own_rows = (as_t(index), as_t(mask))

    def whole(self) -> tuple[np.ndarray, np.ndarray]:
        """(k, 2) scores and (k, N, C) probabilities of every model on the whole split."""
        return evaluate(self.stack, self.x, self.y, probs=True)

    @torch.no_grad()
    def own(self) -> np.ndarray:
        """(k, 2) loss and accuracy of each model on its own validation rows (its share of
        the validation split, in its group's view), in one pass of the stack; all of the
        split when every model validates on all of it."""
        if self.own_rows is None:
            return evaluate(self.stack, self.x, self.y)
        index, mask = self.own_rows
        logits = self.stack.forward(self.x[index])  # (k, V, C): each model its own rows
        p = torch.softmax(logits, 2).float().cpu().numpy()
        s = score(p, self.y[index].cpu().numpy(), mask.cpu().numpy())
        return np.stack([s["nll"], s["accuracy"]], 1)

    def guard(self, rows: list[int], apply: Callable[[], None]) -> list[tuple[int, float, float]]:
        """The merge guard (the greedy-soup rule): `apply()` the merges, then put back the
        parameters and tethers of each model of `rows` whose own validation loss rose.
        -> (row, loss before, loss after) of each model put back, in the order of rows."""
        before = self.own()[:, 0]
        saved = self.stack.rows(torch.tensor(rows, device=self.x.device))  # copies
        apply()
        after = self.own()[:, 0]
        undone = []
        for j, i in enumerate(rows):
            if after[i] > before[i]:
                self.stack.set_rows(i, {key: v[j] for key, v in saved.items()})
                undone.append((i, float(before[i]), float(after[i])))
        return undone

    @torch.no_grad()
    def grams(self, sel: torch.Tensor) -> dict[str, np.ndarray]:
        """Per layer, each selected model's centred Gram of its outputs on the probe batch,
        (n_sel, n, n), from one forward pass of the stack (what CKA compares)."""
        _, taps = self.stack.forward_taps(self.probe, shared=True)
        out = {}
        for name, h in zip(self.stack.layers, taps, strict=True):
            h = h[sel].flatten(2).float()  # (n_sel, n, H)
            hc = h - h.mean(1, keepdim=True)
            out[name] = (hc @ hc.mT).cpu().numpy()  # (n_sel, n, n)
        return out

    @torch.no_grad()
    def outputs(self, sel: torch.Tensor) -> np.ndarray:
        """(n_sel, n, C): each selected model's class probabilities on the probe batch."""
        logits = self.stack.forward(self.probe, shared=True)[sel]
        return torch.softmax(logits.float(), 2).cpu().numpy()
