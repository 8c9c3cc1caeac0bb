"""History queries over 100k instruction records: indexed filters vs the same query on a copy
without the indexes (a full scan), side by side; and absolute seconds per query, whose target
is "well under a second".
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import case, ratios, side_by_side
from ensemble.history import HistoryReader, HistoryWriter
from ensemble.protocol import Instruction

SIZES = {
    "tiny": {"instructions": 2_000, "repeats": 3, "min_seconds": 0.01},
    "default": {"instructions": 100_000, "repeats": 9, "min_seconds": 0.1},
    "full": {"instructions": 100_000, "repeats": 21, "min_seconds": 0.2},
}
MODELS, LAYERS = 64, ("fc1", "fc2", "out")
POLICY = {"name": "threshold", "merge_above": 1.0, "drift_below": -1.0}


def build(path: Path, n: int) -> None:
    """n instruction rows (n/2 decisions, both sides), 32 decisions a round, like a real run."""
    rng = np.random.default_rng(0)
    w = HistoryWriter(path, "bench", "")
    per_round = 32
    for r in range(n // (2 * per_round)):
        rows = []
        for _ in range(per_round):
            i, j = rng.choice(MODELS, 2, replace=False)
            kind = "merge" if rng.random() < 0.5 else "drift"
            layer = LAYERS[rng.integers(3)]
            c = float(rng.normal())
            step = r * 10
            for a, b in ((i, j), (j, i)):
                ins = Instruction(kind, int(a), (int(b),), layer, 0.5, c, "r")
                rows.append((ins, step, step // 100, 1))
        w.round(list(range(MODELS)), {}, rows, POLICY)
    w.close()


def run(size: str) -> tuple[list[dict], list[str], dict]:
    cfg = SIZES[size]
    tmp = Path(tempfile.mkdtemp(prefix="history-bench-"))
    try:
        indexed = tmp / "indexed" / "history.sqlite"
        indexed.parent.mkdir()
        build(indexed, cfg["instructions"])
        scan = tmp / "scan" / "history.sqlite"
        scan.parent.mkdir()
        shutil.copy(indexed, scan)
        with sqlite3.connect(scan) as conn:
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='index' AND name LIKE 'instructions_%'"
            ).fetchall():
                conn.execute(f"DROP INDEX {name}")
        a, b = HistoryReader(indexed), HistoryReader(scan)
        total = a.count("instructions")
        last_step = a.decisions(limit=1, pairs=True)[0].step + total // 64 * 10 // 2
        queries = {
            "filtered: --kind merge --model 3 --layer fc2 --since-step S --limit 50": lambda h: (
                h.decisions(kind="merge", model=3, layer="fc2", since_step=last_step // 2, limit=50)
            ),
            "one model's instructions (pairs=False)": lambda h: h.decisions(model=5, pairs=False),
            "lineage of one model": lambda h: h.lineage(7),
            "every decision (no filter)": lambda h: h.decisions(),
        }
        cases = []
        for name, q in queries.items():
            t = side_by_side(
                {"indexed": lambda q=q: q(a), "scan": lambda q=q: q(b)},
                cfg["repeats"],
                cfg["min_seconds"],
            )
            rows = q(a)
            cases.append(
                case(
                    name,
                    "full-scan seconds / indexed seconds",
                    ratios(t["scan"], t["indexed"]),
                    None,
                    indexed_seconds_median=sorted(t["indexed"])[len(t["indexed"]) // 2],
                    scan_seconds_median=sorted(t["scan"])[len(t["scan"]) // 2],
                    rows=len(rows.edges) if hasattr(rows, "edges") else len(rows),
                )
            )
            cases.append(
                case(
                    f"{name}: seconds per query",
                    "seconds (absolute, indexed)",
                    t["indexed"],
                    ("<=", 1.0),
                )
            )
        notes = [
            f"{total} instruction rows over {MODELS} models; each query's absolute time "
            "has the target (<= 1 s); the scan ratio shows what the indexes buy."
        ]
        return cases, notes, {"instructions": total, "models": MODELS}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
