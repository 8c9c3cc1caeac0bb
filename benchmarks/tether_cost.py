"""Cost of the tether: forward+backward of a tethered MLP vs a plain nn.Linear MLP.

Two tethered forms, each against the plain net of the same sizes:
- parametrized: the built-in MLP with W ⊙ T attached through torch.nn.utils.parametrize,
  the form a single member takes (inference, export);
- stack, k=1: the trainer's path, one model in a Stack (the fused MLP forward).
All take the same batch (32) through forward, cross-entropy and backward, one torch
thread, timed side by side (alternating order) in this process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import case, ratios, side_by_side, spread
from ensemble.model import attach_tethers, init_tethers, mlp
from ensemble.stack import Stack, cross_entropy

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


def parametrized(sizes: list[int]) -> nn.Module:
    net = mlp(sizes, seed=0)
    return attach_tethers(net, init_tethers(net, "normal", 0.1, seed=1))


def stack_step(sizes: list[int], x: torch.Tensor, y: torch.Tensor):
    net = mlp(sizes, seed=0)
    stack = Stack([net], [init_tethers(net, "normal", 0.1, seed=1)])
    xb, yb = x[None], y[None]

    def step():
        for p in stack.parameters():
            p.grad = None
        cross_entropy(stack.forward(xb), yb).sum().backward()

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
                "parametrized": fwd_bwd(parametrized(sizes), x, y),
                "stack": stack_step(sizes, x, y),
                "plain": fwd_bwd(plain_mlp(sizes), x, y),
            },
            cfg["repeats"],
            cfg["min_seconds"],
        )
        for form in ("parametrized", "stack"):
            cases.append(
                case(
                    f"{name} {'-'.join(map(str, sizes))}, batch {BATCH}, {form}",
                    f"tethered ({form}) / plain (fwd+bwd time)",
                    ratios(t[form], t["plain"]),
                    ("<=", 1.15),
                    tethered_seconds=spread(t[form]),
                    plain_seconds=spread(t["plain"]),
                )
            )
    notes = [
        "One torch thread. Each timing averages enough back-to-back steps to last "
        f"{cfg['min_seconds']} s; a tethered layer computes with W * T: one extra elementwise "
        "multiply per layer forward and one per layer backward.",
    ]
    return cases, notes, {"batch": BATCH, "nets": cfg["nets"], "repeats": cfg["repeats"]}
