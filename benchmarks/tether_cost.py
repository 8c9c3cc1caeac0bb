"""Cost of the tether: forward+backward of a tethered module vs the same module plain.

Nets: MLPs (nn.Linear) and CNNs (nn.Conv2d, then a Linear): the examples' digits CNN
(1x8x8 images) and a larger one on 3x32x32. Two tethered forms, each against the plain
module of the same weights:
- parametrized: W ⊙ T attached through torch.nn.utils.parametrize, the form a single
  member takes (inference, export);
- stack, k=1 (no target: it measures the stack machinery at k = 1, which the trainer
  amortises over k models, more than the tether): one model in a Stack (the fused MLP
  forward; torch.func's
  vmap(functional_call) for the CNNs).
All take the same batch (32) through forward, cross-entropy and backward, one torch
thread, timed side by side (alternating order) in this process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import case, ratios, side_by_side, spread
from ensemble.training.model import MLP, attach_tethers, init_tethers
from ensemble.training.stack import Stack, cross_entropy

BATCH = 32
NETS = {
    "seed-dtnn 64-64-64-10": (64, 64, 64, 10),
    "bigger 784-512-512-10": (784, 512, 512, 10),
    "cnn-digits 1x8x8, 8-16 channels": ("cnn", 1, 8, 8),
    "cnn 3x32x32, 32-64 channels": ("cnn", 3, 32, 32),
}
SIZES = {
    "tiny": {
        "nets": {k: NETS[k] for k in ("seed-dtnn 64-64-64-10", "cnn-digits 1x8x8, 8-16 channels")},
        "repeats": 3,
        "min_seconds": 0.01,
    },
    "default": {"nets": NETS, "repeats": 15, "min_seconds": 0.2},
}
SIZES["full"] = {**SIZES["default"], "repeats": 31}


class CNN(nn.Module):
    """conv(c) -> relu -> conv(2c) -> relu -> maxpool 2 -> Linear, on side x side images."""

    def __init__(self, in_ch: int, side: int, c: int, classes: int = 10):
        super().__init__()
        self.in_ch, self.side = in_ch, side
        self.conv1 = nn.Conv2d(in_ch, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.out = nn.Linear(2 * c * (side // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_ch, self.side, self.side)
        x = F.relu(self.conv1(x))
        return self.out(F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1))


def make(spec) -> nn.Module:
    torch.manual_seed(0)
    if spec[0] == "cnn":
        return CNN(*spec[1:])
    return MLP(list(spec))


def features(spec) -> int:
    return spec[1] * spec[2] ** 2 if spec[0] == "cnn" else spec[0]


def plain(spec) -> nn.Module:
    return make(spec) if spec[0] == "cnn" else plain_mlp(list(spec))


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


def parametrized(spec) -> nn.Module:
    net = make(spec)
    return attach_tethers(net, init_tethers(net, "normal", 0.1, seed=1))


def stack_step(spec, x: torch.Tensor, y: torch.Tensor):
    net = make(spec)
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
    for name, spec in cfg["nets"].items():
        x = torch.randn(BATCH, features(spec), generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        t = side_by_side(
            {
                "parametrized": fwd_bwd(parametrized(spec), x, y),
                "stack": stack_step(spec, x, y),
                "plain": fwd_bwd(plain(spec), x, y),
            },
            cfg["repeats"],
            cfg["min_seconds"],
        )
        for form in ("parametrized", "stack"):
            cases.append(
                case(
                    f"{name}, batch {BATCH}, {form}",
                    f"tethered ({form}) / plain (fwd+bwd time)",
                    ratios(t[form], t["plain"]),
                    ("<=", 1.15) if form == "parametrized" else None,
                    tethered_seconds=spread(t[form]),
                    plain_seconds=spread(t["plain"]),
                )
            )
    notes = [
        "One torch thread. Each timing averages enough back-to-back steps to last "
        f"{cfg['min_seconds']} s; a tethered layer computes with W * T: one extra elementwise "
        "multiply per layer forward and one per layer backward.",
    ]
    nets = {k: list(v) for k, v in cfg["nets"].items()}
    return cases, notes, {"batch": BATCH, "nets": nets, "repeats": cfg["repeats"]}
