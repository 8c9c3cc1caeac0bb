"""Compatibility registry and the coordinator's preallocated tether bank.

A compatibility function maps a layer's Gram matrix (M, M) to an (M, M) compatibility
matrix. All three come from the same single matmul over the bank's (M, P) buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ensemble.coordination import maths

CompatFn = Callable[[np.ndarray], np.ndarray]
SAME_TOL = 1e-10  # squared distance below which two tethers are one (already merged)

COMPAT: dict[str, CompatFn] = {
    "dot": lambda g: g,  # the seed's sum(T_i * T_j)
    "cosine": maths.cosine_from_gram,
    "rbf": maths.rbf_from_gram,  # exp(-||T_i - T_j||^2 / h), h by the median heuristic
    # Function space: linear CKA of the models' layer outputs on a fixed probe batch. The
    # coordinator applies it to the Gram of its bank of probe-batch Grams, not to tethers.
    "cka": maths.cosine_from_gram,
}


def get_compat(name: str) -> CompatFn:
    if name not in COMPAT:
        raise ValueError(f"unknown compatibility {name!r}; choose one of {sorted(COMPAT)}")
    return COMPAT[name]


class TetherBank:
    """Latest tethers of every model, one preallocated (M, P) float32 buffer per layer.

    Rows are written in place on each publication; no per-round restacking. The Gram is
    kept between rounds and only the rows written since are recomputed: tethers change only
    through the coordinator's own instructions, so a round after a quiet one costs a
    fraction of the full (M, M, P) matmul.
    """

    def __init__(self, count: int, shapes: dict[str, tuple[int, ...]]):
        self.count = count
        self.shapes = dict(shapes)
        self.buffers = {
            name: np.zeros((count, int(np.prod(s))), dtype=np.float32) for name, s in shapes.items()
        }  # layer -> (M, P)
        self._gram = {name: np.empty((count, count), dtype=np.float32) for name in shapes}
        self._dirty = {name: np.ones(count, dtype=bool) for name in shapes}  # rows to redo

    def write(self, model: int, tethers: dict[str, np.ndarray]) -> None:
        for name, arr in tethers.items():
            if name not in self.buffers:
                raise ValueError(f"unknown layer {name!r}; layers are {sorted(self.buffers)}")
            if tuple(arr.shape) != self.shapes[name]:
                raise ValueError(
                    f"layer {name!r}: tether shape {tuple(arr.shape)}, expected {self.shapes[name]}"
                )
            self.buffers[name][model] = arr.reshape(-1)
            self._dirty[name][model] = True

    def row(self, model: int, layer: str) -> np.ndarray:
        return self.buffers[layer][model].reshape(self.shapes[layer])

    def tethers(self, model: int) -> dict[str, np.ndarray]:
        return {name: self.row(model, name).copy() for name in self.buffers}

    def gram(self, layer: str) -> np.ndarray:
        """(M, M) Gram of the layer, in a preallocated buffer: the rows written since the
        last call are recomputed (one (d, P) x (P, M) matmul), or all of it when most are."""
        x, g, dirty = self.buffers[layer], self._gram[layer], self._dirty[layer]
        rows = np.flatnonzero(dirty)
        if len(rows) * 2 > self.count:
            maths.gram(x, out=g)
        elif len(rows):
            part = x[rows] @ x.T  # (d, M)
            g[rows, :] = part
            g[:, rows] = part.T
            block = part[:, rows]  # symmetric exactly, like the full product
            g[np.ix_(rows, rows)] = np.triu(block) + np.triu(block, 1).T
        dirty[:] = False
        return g

    def compat(
        self, layer: str, fn: str, rows: np.ndarray, normalize: str = "none", dtype=np.float64
    ):
        """Compatibility and squared distances among `rows` (model ids), each (k, k),
        computed in float64 and returned as `dtype`; at most two float64 (k, k) arrays
        live at once (at M = 4,096 each is 134 MB)."""
        g = self.gram(layer)  # float32; the maths below upcasts to float64 as it goes
        everyone = len(rows) == self.count and (rows == np.arange(self.count)).all()
        if not everyone:
            g = g[np.ix_(rows, rows)]
        sq = maths.sq_dist_from_gram(g)
        same = sq <= SAME_TOL
        sq = sq.astype(dtype, copy=False)
        c = get_compat(fn)(g)
        if c is g or c.dtype != np.float64:  # "dot" is the Gram itself: never write into it
            c = c.astype(np.float64)
        if normalize == "zscore":
            c = maths.zscore_offdiag(c, same=same, out=c)
        return c.astype(dtype, copy=False), sq


def peer_bank(count: int, shapes: dict, peers: dict) -> tuple[TetherBank, dict[str, list[int]]]:
    """The bank of `count` models and the fixed peers after them, and each layer's peer rows."""
    bank = TetherBank(count + len(peers), shapes)
    rows: dict[str, list[int]] = {}
    for k, (layer, tether) in enumerate(peers.values()):
        bank.write(count + k, {layer: tether})
        rows.setdefault(layer, []).append(count + k)
    return bank, rows


def layer_compat(
    bank: TetherBank, features: TetherBank | None, cc, layer: str, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Compatibility (`cc`: the compat settings) and squared tether distances among `rows`,
    each (k, k); in function space (cka) from the probe-batch `features`, once there are any.

    Computed in float64, kept as float32: the history stores float32, so decisions are
    taken on the very values `--explain` shows, and a round's matrices take half the
    memory (67 MB each per layer at M = 4,096). The policy only tests distances against
    SAME_TOL, and repulsion upcasts them again."""
    if features is None or cc.fn != "cka":
        return bank.compat(layer, cc.fn, rows, cc.normalize, dtype=np.float32)
    g = bank.gram(layer)[np.ix_(rows, rows)].astype(np.float64)
    sq = maths.sq_dist_from_gram(g)
    c = features.compat(layer, "cosine", rows)[0]  # linear CKA
    if cc.normalize == "zscore":
        c = maths.zscore_offdiag(c, same=sq <= SAME_TOL)
    return c.astype(np.float32), sq.astype(np.float32)
