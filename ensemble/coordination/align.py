"""Permutation alignment of two MLPs or conv chains by weight matching (Ainsworth et al.,
git re-basin).

Hidden units of two independently trained MLPs compute similar features in different orders.
Before their layers are compared or averaged, the partner's units are permuted into this
model's order. Weight matching picks, per hidden layer, the permutation that maximises
<W_a, P W_b P_prev^T> summed over the layers the units touch, by coordinate descent with
one linear assignment per layer and step.
"""

from __future__ import annotations

import numpy as np

# layer -> (effective weight W * T, bias (out,)), layers in forward order. A weight is
# (out, in) for a Linear or (out, in, kh, kw) for a Conv2d; a layer's inputs are the previous
# layer's units, each repeated over a block of positions (a kernel's, or those a flatten
# lays out channel by channel), so a chain of convolutions then Linears aligns like an MLP.
Params = dict[str, tuple[np.ndarray, np.ndarray]]


def _by_unit(w: np.ndarray, units: int) -> np.ndarray:
    """(out, in, ...) -> (out, units, block): the inputs grouped by the unit they come from."""
    size = int(np.prod(w.shape[1:]))
    if size % units:
        raise ValueError(
            f"a layer with {size} inputs cannot follow one of {units} units: alignment needs "
            "the tethered layers to form a chain (set policy.align=false for this model)"
        )
    return w.reshape(w.shape[0], units, size // units)


def _inputs(w: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """w with its inputs (grouped by unit) in the order `perm`."""
    return _by_unit(w, len(perm))[:, perm].reshape(w.shape)


def weight_matching(
    a: Params,
    b: Params,
    max_iter: int = 30,
    seed: int = 0,
    init: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Permutations of b's hidden units that align b to a: one per hidden layer.

    perm[l][k] is the unit of b that plays a's unit k in hidden layer l, so
    b's aligned layer l is W_b[perm[l]][:, perm[l - 1]] (see `permute`). init: where the
    coordinate descent starts (e.g. the same pair's last alignment: weights move little
    between two merges, so it converges in a sweep or two); identity by default.
    """
    from scipy.optimize import linear_sum_assignment  # here: workers that never align skip it

    names = list(a)
    if list(b) != names:
        raise ValueError(f"layers differ: {names} vs {list(b)}")
    widths = [a[n][0].shape[0] for n in names[:-1]]  # hidden widths (units or channels)
    perms = [np.arange(h) for h in widths] if init is None else [p.copy() for p in init]
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for l in rng.permutation(len(widths)):  # noqa: E741 - layer index, as in the paper
            wa, ba = a[names[l]]
            wb, bb = b[names[l]]
            if l > 0:  # inputs of layer l are the units of layer l - 1
                wb = _inputs(wb, perms[l - 1])
            flat_a, flat_b = wa.reshape(len(wa), -1), wb.reshape(len(wb), -1)
            score = flat_a @ flat_b.T + np.outer(ba, bb)  # (H_l, H_l): a's unit k vs b's k'
            wa_next, wb_next = a[names[l + 1]][0], b[names[l + 1]][0]
            if l + 1 < len(widths):  # outputs of the next layer are permuted too
                wb_next = wb_next[perms[l + 1]]
            h = widths[l]
            score += np.einsum("okr,opr->kp", _by_unit(wa_next, h), _by_unit(wb_next, h))
            _, cols = linear_sum_assignment(score, maximize=True)
            if not np.array_equal(cols, perms[l]):
                perms[l], changed = cols, True
        if not changed:
            break
    return perms


def permute(x: np.ndarray, layer: int, perms: list[np.ndarray]) -> np.ndarray:
    """Layer `layer`'s weight (out, in, ...), or (out,) bias, of b in a's unit order."""
    if layer < len(perms):
        x = x[perms[layer]]
    if x.ndim >= 2 and layer > 0:
        x = _inputs(x, perms[layer - 1])
    return x


def inverse(perms: list[np.ndarray]) -> list[np.ndarray]:
    """The permutations that align a to b, given those that align b to a."""
    return [np.argsort(p) for p in perms]
