"""The tethered MLP: every linear layer computes F.linear(x, W * T, b) with T a buffer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ensemble.errors import ConfigError

# Hidden-layer layouts; input and output widths come from the dataset.
PRESETS: dict[str, list[int]] = {
    "seed-dtnn": [64, 64],  # the DTNN seed's Net: 128-64-64-10 on its own data
    "autoregressive": [256],  # the surge-collapse seed's AutoRegressiveModel: in-256-out
}

TETHER_INITS = ("uniform", "ones", "normal")


def hidden_sizes(preset: str, layers: list[int] | None) -> list[int]:
    if layers:
        return list(layers)
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown name {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def layer_names(n_linear: int) -> list[str]:
    """fc1, fc2, ..., out: the seed's names."""
    return [f"fc{i + 1}" for i in range(n_linear - 1)] + ["out"]


def init_tether(shape: tuple[int, ...], kind: str, std: float, gen: torch.Generator):
    if kind == "uniform":  # the seed's np.random.rand
        return torch.rand(shape, generator=gen)
    if kind == "ones":
        return torch.ones(shape)
    if kind == "normal":
        return 1.0 + std * torch.randn(shape, generator=gen)
    raise ConfigError(f"tether.init: unknown {kind!r}; choose one of {list(TETHER_INITS)}")


class TetheredLinear(nn.Module):
    """nn.Linear whose weight is modulated elementwise by a non-trained tether buffer."""

    def __init__(self, n_in: int, n_out: int, tether: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.register_buffer("tether", tether.to(torch.float32))  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear.weight * self.tether, self.linear.bias)


class TetheredMLP(nn.Module):
    def __init__(
        self,
        sizes: list[int],
        tether_init: str = "normal",
        tether_std: float = 0.1,
        seed: int = 0,
        tether_seed: int | None = None,
    ):
        """sizes: [in, hidden..., out]. seed: the weight init; tether_seed: the tether init
        (default seed + 7919, its own stream), so models can share weights but not tethers."""
        super().__init__()
        torch.manual_seed(seed)  # weight init
        gen = torch.Generator().manual_seed(seed + 7919 if tether_seed is None else tether_seed)
        self.sizes = list(sizes)
        self.names = layer_names(len(sizes) - 1)
        self.layers = nn.ModuleDict(
            {
                name: TetheredLinear(
                    n_in, n_out, init_tether((n_out, n_in), tether_init, tether_std, gen)
                )
                for name, n_in, n_out in zip(self.names, sizes[:-1], sizes[1:], strict=True)
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_hidden(x)[0]

    def forward_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every hidden layer's post-ReLU activations, (B, H_l) each."""
        hidden = []
        for name in self.names[:-1]:
            x = torch.relu(self.layers[name](x))
            hidden.append(x)
        return self.layers[self.names[-1]](x), hidden

    def weight_matrices(self) -> dict[str, torch.Tensor]:
        """layer -> W (the trained weight, not W * T): what surge-collapse acts on."""
        return {n: self.layers[n].linear.weight for n in self.names}

    def probes(self) -> tuple[float, float]:
        """The seed's tracked weights: fc1.weight[0, 0] and the second layer's [0, 0]."""
        first, second = self.names[0], self.names[1]
        return (
            float(self.layers[first].linear.weight[0, 0].detach()),
            float(self.layers[second].linear.weight[0, 0].detach()),
        )

    def tether_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: tuple(self.layers[n].tether.shape) for n in self.names}

    def export_tethers(self) -> dict[str, np.ndarray]:
        """layer -> float32 array (out, in), a copy."""
        return {n: self.layers[n].tether.detach().cpu().numpy().copy() for n in self.names}

    def import_tethers(self, tethers: dict[str, np.ndarray]) -> None:
        for name, arr in tethers.items():
            if name not in self.layers:
                raise ValueError(f"tether for unknown layer {name!r}; layers are {self.names}")
            buf = self.layers[name].tether
            if tuple(arr.shape) != tuple(buf.shape):
                raise ValueError(
                    f"tether {name!r} has shape {tuple(arr.shape)}, expected {tuple(buf.shape)}"
                )
            buf.copy_(torch.as_tensor(np.asarray(arr, dtype=np.float32)))

    def tethered_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """layer -> (W * T, bias) as numpy copies: what the layer computes with."""
        out = {}
        for n in self.names:
            layer = self.layers[n]
            w = (layer.linear.weight * layer.tether).detach().cpu().numpy()
            out[n] = (w, layer.linear.bias.detach().cpu().numpy().copy())
        return out

    def weights(self) -> dict[str, np.ndarray]:
        """Every parameter and tether as numpy, keyed for safetensors."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}
