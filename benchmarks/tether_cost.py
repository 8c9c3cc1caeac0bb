"""Cost of the tether: TetheredMLP forward+backward vs a plain nn.Linear MLP of the same sizes.

Both nets take the same batch (32) through forward, cross-entropy and backward, one torch
thread, timed side by side (alternating order) in this process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import case, ratios, side_by_side, spread
from ensemble.model import TetheredMLP

BATCH = 32
SIZES = {
    "tiny": {"nets": {"seed-dtnn": [64, 64, 64, 10]}, "repeats": 3, "min_seconds": 0.01},
    "default": {
        "nets": {"seed-dtnn": [64, 64, 64, 10], "bigger": [784, 512, 512, 10]},
        "repeats": 15,
        "min_seconds": 0.2,
    },
}
SIZES["full"] = {**SIZES["default"], "repeats": 31}


def plain_mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no ReLU after the output layer


def fwd_bwd(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    return step


def run(size: str) -> tuple[list[dict], list[str], dict]:
    cfg = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    cases = []
    for name, sizes in cfg["nets"].items():
        x = torch.randn(BATCH, sizes[0], generator=gen)
        y = torch.randint(0, sizes[-1], (BATCH,), generator=gen)
        t = side_by_side(
            {
                "tethered": fwd_bwd(TetheredMLP(sizes, "normal", 0.1, seed=0), x, y),
                "plain": fwd_bwd(plain_mlp(sizes), x, y),
            },
            cfg["repeats"],
            cfg["min_seconds"],
        )
        cases.append(
            case(
                f"{name} {'-'.join(map(str, sizes))}, batch {BATCH}",
                "tethered / plain (fwd+bwd time)",
                ratios(t["tethered"], t["plain"]),
                ("<=", 1.15),
                tethered_seconds=spread(t["tethered"]),
                plain_seconds=spread(t["plain"]),
            )
        )
    notes = [
        "One torch thread. Each timing averages enough back-to-back steps to last "
        f"{cfg['min_seconds']} s; the tethered net computes F.linear(x, W * T, b), i.e. one "
        "extra elementwise multiply per layer forward and one per layer backward.",
    ]
    return cases, notes, {"batch": BATCH, "nets": cfg["nets"], "repeats": cfg["repeats"]}
