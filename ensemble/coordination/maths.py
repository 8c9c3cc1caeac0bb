"""Tensor maths of the coordinator as free functions: Gram, compatibility, merge, drift.

Each is tested against the slow, obvious loop (the seed's `torch.sum(a * b)`).
"""

from __future__ import annotations

import math

import numpy as np


def gram(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(M, P) -> (M, M) of row dot products: one matmul, no pair loop."""
    return np.matmul(x, x.T, out=out)


def cosine_from_gram(g: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(g).astype(np.float64), 0.0, None))  # (M,)
    out = np.outer(norms, norms)  # one (M, M) temporary: at M = 4,096 each is 134 MB
    np.maximum(out, eps, out=out)
    return np.divide(g, out, out=out)


def sq_dist_from_gram(g: np.ndarray) -> np.ndarray:
    """||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij, clipped at 0 against rounding."""
    d = np.diag(g).astype(np.float64)
    out = np.multiply(g, -2.0, dtype=np.float64)
    out += d[:, None]
    out += d[None, :]
    return np.clip(out, 0.0, None, out=out)


def median_bandwidth(sq: np.ndarray) -> float:
    """Median heuristic: h = median of off-diagonal squared distances (1.0 if all zero)."""
    m = sq.shape[0]
    if m < 2:
        return 1.0
    off = sq[np.triu_indices(m, k=1)]
    h = float(np.median(off))
    return h if h > 0 else 1.0


def rbf_from_gram(g: np.ndarray) -> np.ndarray:
    sq = sq_dist_from_gram(g)
    return np.exp(-sq / median_bandwidth(sq))


def zscore_offdiag(
    c: np.ndarray, same: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Standardise off-diagonal entries (mean 0, sd 1); the diagonal is left at 0.

    `same` (bool, (M, M)) marks pairs whose tethers are identical (already merged): they
    are left out of the mean and sd, so one merged pair does not squash everyone else.
    The statistics are sums over the whole matrix less the diagonal and the `same` pairs,
    so no masked copy of the M^2 entries is made. `out` may be `c` itself (float64).
    """
    m = c.shape[0]
    if m < 2:
        out = np.zeros_like(c, dtype=np.float64) if out is None else out
        out[...] = 0.0
        return out
    diag = np.diag(c).astype(np.float64)
    n, s1 = m * m - m, float(c.sum(dtype=np.float64) - diag.sum())
    s2 = float(np.einsum("ij,ij->", c, c, dtype=np.float64) - (diag * diag).sum())
    if same is not None:
        off = same.copy()
        np.fill_diagonal(off, False)
        k = int(off.sum())
        if k < n:  # else every pair is the same: fall back to all of them
            v = c[off].astype(np.float64)
            n, s1, s2 = n - k, s1 - float(v.sum()), s2 - float((v * v).sum())
    mean = s1 / n
    sd = math.sqrt(max(s2 / n - mean * mean, 0.0))
    if out is None:
        out = np.empty_like(c, dtype=np.float64)
    if sd <= 1e-12 * max(1.0, abs(mean)):
        out[...] = 0.0
        return out
    np.subtract(c, mean, out=out)
    out /= sd
    np.fill_diagonal(out, 0.0)
    return out


def centered_gram(x: np.ndarray) -> np.ndarray:
    """(n, H) activations on a probe batch -> (n, n) Gram of the centred activations.

    Linear CKA between two models' layers is the cosine of their flattened centred Grams,
    so a bank of these rows gives every pair's CKA from one matmul. CKA does not change
    when hidden units are permuted (or rotated, or scaled), which tethers' cosine does.
    """
    xc = x - x.mean(axis=0, keepdims=True)
    return (xc @ xc.T).astype(np.float32, copy=False)


def rbf_repulsion(x: np.ndarray, sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repulsive force on each row of x (k, P) from all others, and the kernel (k, k).

    r_i = sum_j k_ij (x_i - x_j) / (k - 1), k_ij = exp(-||x_i - x_j||^2 / h) with h by the
    median heuristic: SVGD's repulsive term sum_j grad_{x_j} k(x_j, x_i), times h / 2 so that
    a drift of rate eta moves a model at most eta of its mean distance to the others.
    """
    m = len(x)
    sq = np.asarray(sq, dtype=np.float64)
    kern = np.exp(-sq / median_bandwidth(sq))
    np.fill_diagonal(kern, 0.0)
    r = kern.sum(axis=1, keepdims=True) * x - kern @ x
    return r / max(m - 1, 1), kern
