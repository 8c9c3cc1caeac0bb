"""The coordinator's per-layer Gram vs the seed's pair loop, and vs this machine's roofline.

Gram: `maths.gram` (one `np.matmul(X, X.T)` into a preallocated (M, M) output, what
`TetherBank.gram` does when most rows changed) over the bank's (M, P) float32 buffer;
beside it torch.mm of the same buffer, which issue 16 proposed for small M. Pair loop:
the seed's `torch.sum(a * b).item()` over the M (M + 1) / 2 pairs i <= j (the diagonal
is needed for cosine), tethers already torch tensors. Roofline: memory bandwidth and
matmul FLOP/s measured in the same run; the bound for one Gram is max(bytes / bandwidth,
flops / peak), bytes = the buffer read once plus the (M, M) output, flops = M (M + 1) P
(the symmetric product, one multiply-add per pair and element). BLAS runs on one
thread, as in the coordinator actor (Ray sets OMP_NUM_THREADS=1 for a num_cpus=0 actor).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import case, ratios, side_by_side, spread
from ensemble.coordination import maths
from ensemble.coordination.compat import TetherBank

TARGET_POINT = (64, 13_000)  # ~ all tethers of the seed Net 128-64-64-10: 8192+4096+640
GRIDS = {
    "tiny": {
        "M": [4, 8],
        "P": [1024, 4096],
        "extra": [TARGET_POINT],  # small enough for CI
        "repeats": 3,
        "probe_mib": 16,
        "n": 256,
    },
    "default": {
        "M": [8, 64, 256],
        "P": [4096, 100_000, 1_000_000],
        "extra": [TARGET_POINT],
        "repeats": 7,
        "probe_mib": 512,
        "n": 2048,
    },
}
GRIDS["full"] = {**GRIDS["default"], "repeats": 15}
PAIR_LOOP_BUDGET = 2e8  # elements multiplied per timed pair loop; beyond this, sample pairs


def roofline(probe_mib: int, n: int, repeats: int) -> dict:
    """Best-of-repeats memory bandwidth (bytes/s) and float32 matmul FLOP/s, one thread."""
    a = np.random.default_rng(0).random(probe_mib * 2**18, dtype=np.float32)
    b = np.empty_like(a)
    rows = a.reshape(-1, 1024)
    ones = np.ones(1024, dtype=np.float32)
    x = np.random.default_rng(1).random((n, n), dtype=np.float32)
    y = np.random.default_rng(2).random((n, n), dtype=np.float32)
    t = side_by_side(
        {
            "sum": a.sum,
            "copy": lambda: np.copyto(b, a),
            "matvec": lambda: rows @ ones,
            "matmul": lambda: x @ y,
        },
        repeats,
    )
    bw = {
        "sum": [a.nbytes / s for s in t["sum"]],
        "copy": [2 * a.nbytes / s for s in t["copy"]],  # read + write
        "matvec": [a.nbytes / s for s in t["matvec"]],
    }
    flops = [2 * n**3 / s for s in t["matmul"]]
    return {
        "bandwidth_bytes_per_s": max(max(v) for v in bw.values()),
        "peak_flops": max(flops),
        "bandwidth_probes_gb_per_s": {k: spread([x / 1e9 for x in v]) for k, v in bw.items()},
        "matmul_gflops": spread([x / 1e9 for x in flops]),
        "probe_bytes": a.nbytes,
        "matmul_n": n,
    }


def pair_loop(rows: list[torch.Tensor], pairs: list[tuple[int, int]]) -> float:
    """The seed's compatibility, one Python-level pair at a time."""
    total = 0.0
    for i, j in pairs:
        total += torch.sum(rows[i] * rows[j]).item()
    return total


def one_point(m: int, p: int, roof: dict, repeats: int) -> list[dict]:
    bank = TetherBank(m, {"t": (p,)})
    bank.buffers["t"][:] = np.random.default_rng(m * 7 + p).normal(1.0, 0.1, (m, p))
    rows = [torch.from_numpy(bank.buffers["t"][i]) for i in range(m)]
    all_pairs = [(i, j) for i in range(m) for j in range(i, m)]
    k = min(len(all_pairs), max(8, int(PAIR_LOOP_BUDGET // p)))
    pick = np.random.default_rng(0).choice(len(all_pairs), size=k, replace=False)
    sample = [all_pairs[i] for i in sorted(pick)]
    scale = len(all_pairs) / k  # 1.0 when every pair is timed

    x = bank.buffers["t"]
    tx = torch.from_numpy(x)
    full = np.empty((m, m), dtype=np.float32)
    t = side_by_side(
        {
            "gram": lambda: maths.gram(x, out=full),  # what a round with every row changed does
            "torch": lambda: torch.mm(tx, tx.T),
            "loop": lambda: pair_loop(rows, sample),
        },
        repeats,
    )
    loop = [s * scale for s in t["loop"]]
    gram = t["gram"]

    nbytes = 4 * (m * p + m * m)
    flops = m * (m + 1) * p
    bound = max(nbytes / roof["bandwidth_bytes_per_s"], flops / roof["peak_flops"])
    point = f"M={m} P={p:,}"
    speed_target = (">=", 50.0) if (m, p) == TARGET_POINT else None
    roof_target = ("<=", 1.5) if m * p >= 1_000_000 else None
    g = spread(gram)
    return [
        case(
            point,
            "pair loop / Gram (speed-up)",
            ratios(loop, gram),
            speed_target,
            gram_seconds=g,
            pair_loop_seconds=spread(loop),
            pairs=len(all_pairs),
            pairs_timed=k,
            extrapolated=k < len(all_pairs),
        ),
        case(
            point,
            "torch.mm Gram / numpy Gram (seconds)",
            ratios(t["torch"], gram),
            torch_seconds=spread(t["torch"]),
        ),
        case(
            point,
            "Gram / roofline bound",
            [s / bound for s in gram],
            roof_target,
            bound_seconds=bound,
            bound_by="memory"
            if nbytes / roof["bandwidth_bytes_per_s"] >= flops / roof["peak_flops"]
            else "compute",
            bytes=nbytes,
            flops=flops,
            achieved_gflops=flops / g["median"] / 1e9,
            achieved_gb_per_s=nbytes / g["median"] / 1e9,
        ),
    ]


def run(size: str) -> tuple[list[dict], list[str], dict]:
    grid = GRIDS[size]
    points = sorted({(m, p) for m in grid["M"] for p in grid["P"]} | set(grid["extra"]))
    notes = [
        "BLAS limited to 1 thread (threadpoolctl), torch to 1 thread: as in the coordinator.",
        "Roofline bound = max(bytes / bandwidth, flops / peak); bandwidth = best of sum, copy "
        "(read + write) and matvec probes; peak = best float32 square matmul.",
        "Pair loop over all M(M+1)/2 pairs i <= j; where that exceeds "
        f"{PAIR_LOOP_BUDGET:.0e} multiplied elements, a fixed random sample of pairs is timed "
        "and the time scaled up by pairs/sample (details.extrapolated).",
    ]
    with threadpool_limits(1):
        t0 = time.perf_counter()
        roof = roofline(grid["probe_mib"], grid["n"], grid["repeats"])
        cases = []
        for m, p in points:
            cases += one_point(m, p, roof, grid["repeats"])
    notes.append(
        f"Roofline: {roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"{roof['peak_flops'] / 1e9:.1f} GFLOP/s (measured in {time.perf_counter() - t0:.0f} s "
        "with the grid)."
    )
    return cases, notes, {"points": points, "repeats": grid["repeats"], "roofline": roof}
