"""Compatibility maths against the seed's naive pair loop; merge and drift properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ensemble import protocol
from ensemble.coordination import maths
from ensemble.coordination.compat import COMPAT, TetherBank


def seed_compat(a: np.ndarray, b: np.ndarray) -> float:
    """The seed's compatibility, verbatim: torch.sum(tether_i * tether_j).item()."""
    return torch.sum(torch.tensor(a) * torch.tensor(b)).item()


def naive(x: np.ndarray, fn) -> np.ndarray:
    m = len(x)
    return np.array([[fn(x[i], x[j]) for j in range(m)] for i in range(m)])


def test_gram_matches_seed_pair_loop():
    rng = np.random.default_rng(0)
    x = rng.random((6, 64 * 64), dtype=np.float32)
    expected = naive(x, seed_compat)
    np.testing.assert_allclose(maths.gram(x), expected, rtol=1e-4)


def test_cosine_and_rbf_match_naive_loops():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 0.3, (5, 200))
    g = maths.gram(x)
    cos = naive(x, lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    np.testing.assert_allclose(COMPAT["cosine"](g), cos, rtol=1e-9)
    sq = naive(x, lambda a, b: np.sum((a - b) ** 2))
    h = np.median([sq[i, j] for i in range(5) for j in range(i + 1, 5)])
    np.testing.assert_allclose(COMPAT["rbf"](g), np.exp(-sq / h), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(COMPAT["dot"](g), naive(x, np.dot), rtol=1e-9)


def test_bank_compat_uses_its_preallocated_buffer():
    bank = TetherBank(4, {"fc1": (3, 5)})
    buf = bank.buffers["fc1"]
    rng = np.random.default_rng(2)
    for m in range(4):
        bank.write(m, {"fc1": rng.random((3, 5), dtype=np.float32)})
    assert bank.buffers["fc1"] is buf  # written in place, never restacked
    c, _ = bank.compat("fc1", "dot", np.array([0, 2, 3]))
    full = naive(buf.astype(np.float64), np.dot)
    np.testing.assert_allclose(c, full[np.ix_([0, 2, 3], [0, 2, 3])], rtol=1e-5)


def test_bank_gram_recomputes_only_written_rows_and_stays_the_full_product(monkeypatch):
    """After a round, only rows written since are recomputed; the result is the full
    Gram of the buffer (to float32 rounding) and exactly symmetric, whatever rows change."""
    rng = np.random.default_rng(3)
    bank = TetherBank(10, {"fc1": (4, 6)})
    for m in range(10):
        bank.write(m, {"fc1": rng.normal(1, 0.1, (4, 6)).astype(np.float32)})
    bank.gram("fc1")

    def full_product(*_a, **_k):
        raise AssertionError("the full Gram was recomputed for a few written rows")

    monkeypatch.setattr(maths, "gram", full_product)
    for rows in ([3], [0, 9], [2, 5, 7], []):
        for m in rows:
            bank.write(m, {"fc1": rng.normal(1, 0.1, (4, 6)).astype(np.float32)})
        g = bank.gram("fc1").copy()
        x = bank.buffers["fc1"].astype(np.float64)
        np.testing.assert_allclose(g, x @ x.T, rtol=1e-5)
        np.testing.assert_array_equal(g, g.T)
    assert not bank._dirty["fc1"].any()


def test_zscore_leaves_identical_pairs_out_of_the_statistics():
    c = np.array(
        [[1.0, 1.0, 0.2, 0.4], [1.0, 1.0, 0.2, 0.4], [0.2, 0.2, 1, 0.6], [0.4, 0.4, 0.6, 1]]
    )
    same = np.zeros((4, 4), dtype=bool)
    same[0, 1] = same[1, 0] = True
    z = maths.zscore_offdiag(c, same)
    others = z[~np.eye(4, dtype=bool) & ~same]
    assert abs(others.mean()) < 1e-12 and abs(others.std() - 1) < 1e-12
    assert z[0, 1] > 2  # the merged pair sits far above everyone else


vec = arrays(np.float32, 12, elements=st.floats(0, 2, width=32, allow_subnormal=False))


@settings(max_examples=60, deadline=None)
@given(vec, vec)
def test_merge_at_half_moves_both_to_their_average(a, b):
    np.testing.assert_allclose(protocol.merge(a, b, 0.5), (a + b) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(protocol.merge(a, b, 0.5), protocol.merge(b, a, 0.5))


@settings(max_examples=60, deadline=None)
@given(vec, vec, st.floats(0.01, 1.0))
def test_drift_increases_distance_within_clip_range(a, b, eta):
    a2, b2 = protocol.drift(a, b, eta, 0.0, 2.0), protocol.drift(b, a, eta, 0.0, 2.0)
    assert np.all((a2 >= 0) & (a2 <= 2) & (b2 >= 0) & (b2 <= 2))
    assert np.linalg.norm(a2 - b2) >= np.linalg.norm(a - b) - 1e-5
    inside = (a + eta * (a - b) >= 0) & (a + eta * (a - b) <= 2)
    inside &= (b + eta * (b - a) >= 0) & (b + eta * (b - a) <= 2)
    if inside.all() and np.linalg.norm(a - b) > 1e-3:  # unclipped: strictly farther
        assert np.linalg.norm(a2 - b2) > np.linalg.norm(a - b)


@pytest.mark.parametrize("seed", range(5))
def test_zscore_from_sums_equals_the_masked_statistics(seed):
    """The z-score takes its mean and sd from sums (no masked copy of M^2 entries); it must
    equal the obvious computation over the off-diagonal pairs that are not `same`."""
    rng = np.random.default_rng(seed)
    m = 30
    c = rng.normal(0.5, 0.2, (m, m))
    c = (c + c.T) / 2
    same = rng.random((m, m)) < 0.1
    same = same | same.T | np.eye(m, dtype=bool)
    stats = ~np.eye(m, dtype=bool) & ~same
    expected = (c - c[stats].mean()) / c[stats].std()
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(maths.zscore_offdiag(c, same), expected, rtol=1e-9, atol=1e-12)
