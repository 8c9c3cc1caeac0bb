"""The maths of gravity (coordination.policies.GravityPolicy) as free functions: who may share
(galaxies, from what members compute), and how much (attention, from how they learn).

- `function_distance`: members' class probabilities on one shared probe batch -> (k, k)
  distances, 1 - the mean over classes of the correlation (over probe inputs) of their
  double-centred log-probabilities: blind to a member's label prior and calibration, so
  label skew alone does not part members, while different label maps or inputs seen
  differently do.
- `galaxies`: average-linkage clusters of those distances, the cut with the best
  silhouette; one galaxy unless that silhouette clears `split` (a population that does not
  split clearly stays whole).
- `update_cosine`: (k, k) cosine of the members' weight updates since the last round.
- `attention`: within each galaxy, each member's weights over its galaxy-mates,
  softmax(sigma * mean update cosine), itself counted at its best mate's compatibility.

Each is tested against the slow, obvious loop.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def function_distance(probs: np.ndarray) -> np.ndarray:
    """probs (k, n, C) on the probe batch -> (k, k) distances in [0, 2], zero diagonal."""
    logp = np.log(np.clip(probs.astype(np.float64), EPS, None))
    z = logp - logp.mean(2, keepdims=True)  # no class prior: centre over classes
    z -= z.mean(1, keepdims=True)  # then over probe inputs, per class
    z /= np.linalg.norm(z, axis=1, keepdims=True) + EPS
    k, _, c = z.shape
    flat = z.reshape(k, -1)
    d = flat @ flat.T  # (k, k): c times the mean over classes of the correlation
    d *= -1.0 / c
    d += 1.0
    d += d.T.copy()  # symmetric to the last bit
    d *= 0.5
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, None, out=d)


def galaxies(dist: np.ndarray, split: float, most: int = 32) -> tuple[np.ndarray, float]:
    """(k,) galaxy labels 0..G-1 (in order of first member) and the silhouette that decided.

    Average linkage over `dist`; among the cuts into 2..min(k - 1, most) clusters, the one
    with the highest silhouette; kept only if it exceeds `split`, else one galaxy."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    k = len(dist)
    one = np.zeros(k, dtype=np.int64)
    if k < 3:
        return one, float("nan")
    tree = linkage(squareform(dist, checks=False), "average")
    best, labels = -1.0, one
    for n in range(2, min(k - 1, most) + 1):
        cut = fcluster(tree, n, "maxclust")
        if len(set(cut)) < 2:
            continue
        s = silhouette(dist, cut)
        if s > best:
            best, labels = s, cut
    if best <= split:
        return one, best
    _, first = np.unique(labels, return_index=True)  # relabel in order of first member
    order = {labels[i]: g for g, i in enumerate(sorted(first))}
    return np.array([order[x] for x in labels], dtype=np.int64), best


def silhouette(dist: np.ndarray, labels: np.ndarray) -> float:
    """The mean silhouette (Rousseeuw 1987) of a clustering of precomputed distances, as
    sklearn's silhouette_score gives it (a member alone in its cluster scores 0): one
    (k, k) x (k, G) product for every member's mean distance to every cluster."""
    _, lab = np.unique(labels, return_inverse=True)
    onehot = np.eye(lab.max() + 1)[lab]  # (k, G)
    sums = dist @ onehot  # (k, G): each member's summed distance to each cluster
    size = onehot.sum(0)
    own = size[lab]
    a = sums[np.arange(len(lab)), lab] / np.maximum(own - 1, 1)
    other = sums / size
    other[np.arange(len(lab)), lab] = np.inf
    b = other.min(1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), EPS), 0.0)
    return float(s.mean())


def update_cosine(now: np.ndarray, before: np.ndarray) -> np.ndarray:
    """(k, P) weights now and at the last round -> (k, k) cosine of their updates."""
    d = (now - before).astype(np.float32)
    g = d @ d.T  # (k, k) float32: the one big matmul of a round
    n = np.sqrt(np.clip(np.diag(g).astype(np.float64), 0.0, None))
    g /= np.maximum(np.outer(n, n), EPS).astype(np.float32)
    return g


def attention(compat: np.ndarray, sigma: float) -> np.ndarray:
    """(k, k) compatibility among one galaxy's members -> (k, k) row-stochastic weights:
    softmax over the galaxy of sigma * compat, a member's own entry set to its best mate's
    compatibility (so it keeps as much of itself as of its closest mate)."""
    z = np.array(compat, dtype=np.float32)  # one (k, k) copy, worked on in place
    k = len(z)
    if k == 1:
        return np.ones((1, 1), np.float32)
    diag = np.diag_indices(k)
    z[diag] = -np.inf
    z[diag] = z.max(1)  # itself: as its best mate
    z *= sigma
    z -= z.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True, dtype=np.float64).astype(np.float32)
    return z
