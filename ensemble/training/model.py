"""Models and their tethers.

A member is a plain `nn.Module`; its tethers live beside it, one per tethered layer (every
`nn.Linear` and `nn.Conv2d`, in registration order), the shape of that layer's weight.
The layer computes with W ⊙ T: the trainer stacks members and multiplies in the tether
itself (ensemble.training.stack); a single module gets it as a `torch.nn.utils.parametrize`
parametrization (`attach_tethers`), so it keeps its own state-dict keys.

The built-in MLP presets are modules like any other: `MLP(sizes)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ensemble.errors import ConfigError

# Hidden-layer layouts; input and output widths come from the dataset.
PRESETS: dict[str, list[int]] = {
    "seed-dtnn": [64, 64],  # the DTNN seed's Net: 128-64-64-10 on its own data
    "autoregressive": [256],  # the surge-collapse seed's AutoRegressiveModel: in-256-out
}

TETHER_INITS = ("uniform", "ones", "normal")
TETHERED_TYPES = (nn.Linear, nn.Conv2d)


def layer_names(n_linear: int) -> list[str]:
    """fc1, fc2, ..., out: the seed's names."""
    return [f"fc{i + 1}" for i in range(n_linear - 1)] + ["out"]


class MLP(nn.Module):
    """The built-in member: fc1 .. fcN-1 with ReLU, then out. Plain: no tethers inside."""

    def __init__(self, sizes: list[int]):
        """sizes: [in, hidden..., out]."""
        super().__init__()
        self.sizes = list(sizes)
        self.names = layer_names(len(sizes) - 1)
        for name, n_in, n_out in zip(self.names, sizes[:-1], sizes[1:], strict=True):
            self.add_module(name, nn.Linear(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names[:-1]:
            x = F.relu(getattr(self, name)(x))
        return getattr(self, self.names[-1])(x)


def mlp(sizes: list[int], seed: int) -> MLP:
    """The MLP with weights drawn from `seed` (torch's default generator, as nn.Linear does)."""
    torch.manual_seed(seed)
    return MLP(sizes)


def tethered_layers(module: nn.Module, select: list[str] | None = None) -> list[str]:
    """Names of the modules whose weight carries a tether, in registration order: every
    nn.Linear and nn.Conv2d, or (select) those named, by module name or type name."""
    mods = [(n, m) for n, m in module.named_modules() if n]
    if select is None:
        return [n for n, m in mods if isinstance(m, TETHERED_TYPES)]
    known = {n for n, _ in mods} | {type(m).__name__ for _, m in mods}
    unknown = [s for s in select if s not in known]
    if unknown:
        raise ConfigError(
            f"model.tethered: {unknown} name no module or module type of the model; it has "
            f"{[n for n, _ in mods][:20]} of types {sorted({type(m).__name__ for _, m in mods})}"
        )
    out = [n for n, m in mods if n in select or type(m).__name__ in select]
    bare = [n for n in out if not isinstance(getattr(dict(mods)[n], "weight", None), nn.Parameter)]
    if bare or not out:
        raise ConfigError(f"model.tethered: {bare or select} have no weight to tether")
    return out


def load_factory(spec: str, key: str = "model.factory") -> Callable:
    """The function a factory key names: 'package.module:function' (imported) or
    '/path/to/file.py:function' (loaded from the file)."""
    target, _, fn = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"{key} {spec!r}: no file {path}")
            name = "ensemble_factory_" + re.sub(r"\W", "_", str(path))
            mod = sys.modules.get(name)
            if mod is None:
                found = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(found)
                found.loader.exec_module(mod)
                sys.modules[name] = mod
        else:
            mod = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{key} {spec!r}: importing {target} failed: {type(e).__name__}: {e}"
        ) from None
    f = getattr(mod, fn, None)
    if not callable(f):
        raise ConfigError(f"{key} {spec!r}: {target} has no function {fn!r}")
    return f


def build_module(cfg, features: int, classes: int) -> nn.Module:
    """A fresh module of the job's architecture (its init drawn from torch's generator)."""
    m = cfg.model
    if m.factory is None:
        return MLP([features, *hidden_sizes(m.preset, m.layers), classes])
    fn = load_factory(m.factory)
    args = factory_args(fn, m.options)[:2]
    given = [features, classes][: len(args)]
    call = ", ".join(
        [
            *(f"{a}={v!r}" for a, v in zip(args, given, strict=True)),
            *(f"{k}={v!r}" for k, v in m.options.items()),
        ]
    )
    try:
        module = fn(*given, **m.options)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"model.factory {m.factory!r}: calling it as {getattr(fn, '__name__', 'factory')}"
            f"({call}) failed: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"model.factory {m.factory!r}: returned {type(module).__name__}, expected a "
            "torch.nn.Module"
        )
    return module


def factory_args(fn: Callable, options: dict) -> list[str]:
    """Which of (features, classes) a factory takes, by its signature: the positional
    parameters that model.options does not fill, in order (`def make():` takes neither,
    `def make(features, classes, width=64)` both). Named for the error message."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): the documented call
        return ["features", "classes"]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return ["features", "classes"]
    positional = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in options
    ]
    return positional[:2] if len(positional) >= 2 else positional


def check_module(module: nn.Module, x: torch.Tensor, classes: int, what: str) -> None:
    """A module the trainer can stack: no buffers, and (B, ...) inputs to (B, classes)."""
    buffers = [n for n, _ in module.named_buffers()]
    if buffers:
        raise ConfigError(
            f"{what}: the module has buffers {buffers[:5]}, which stacked training does not "
            "support (batch norm's running statistics); use GroupNorm or LayerNorm, or "
            "track_running_stats=False"
        )
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as e:
        raise ConfigError(
            f"{what}: its forward failed on a batch of shape {tuple(x.shape)}: "
            f"{type(e).__name__}: {e}"
        ) from None
    want = (x.shape[0], classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{what}: maps a batch of shape {tuple(x.shape)} to {got}; expected {want}, "
            "one logit per class"
        )


def init_tether(shape: tuple[int, ...], kind: str, std: float, gen: torch.Generator):
    if kind == "uniform":  # the seed's np.random.rand
        return torch.rand(shape, generator=gen)
    if kind == "ones":
        return torch.ones(shape)
    if kind == "normal":
        return 1.0 + std * torch.randn(shape, generator=gen)
    raise ValueError(f"tether.init: unknown {kind!r}; choose one of {list(TETHER_INITS)}")


def init_tethers(
    module: nn.Module, kind: str, std: float, seed: int, select: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """layer -> float32 tether shaped like its weight, drawn from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    layers = dict(module.named_modules())
    return {
        n: init_tether(tuple(layers[n].weight.shape), kind, std, gen).float()
        for n in tethered_layers(module, select)
    }


class Tether(nn.Module):
    """The parametrization W -> W ⊙ T, with T a buffer (never trained)."""

    def __init__(self, tether: torch.Tensor):
        super().__init__()
        self.register_buffer("tether", tether.detach().clone().float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.tether


def attach_tethers(module: nn.Module, tethers: dict[str, torch.Tensor]) -> nn.Module:
    """Parametrize each named layer's weight as W ⊙ T, in place; returns the module."""
    layers = dict(module.named_modules())
    for name, t in tethers.items():
        if name not in layers or not hasattr(layers[name], "weight"):
            raise ValueError(f"tether for unknown layer {name!r}; layers are {list(tethers)}")
        parametrize.register_parametrization(layers[name], "weight", Tether(t))
    return module


def fold_tethers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every tether folded in (W ⊙ T under the weight's own
    key): what a plain copy of the module loads with `load_state_dict`."""
    out = {}
    for key, value in module.state_dict().items():
        if ".parametrizations." not in key:
            out[key] = value
    layers = dict(module.named_modules())
    for name, layer in layers.items():
        if parametrize.is_parametrized(layer, "weight"):
            out[f"{name}.weight" if name else "weight"] = layer.weight.detach().clone()
    return out


def hidden_sizes(preset: str, layers: list[int] | None) -> list[int]:
    if layers:
        return list(layers)
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown name {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def member_seed(seed: int, model: int) -> int:
    """Model `model`'s own seed (its data order, its noise) in a job seeded `seed`."""
    return seed * 100_003 + model


def init_seeds(seed: int, model: int, shared: bool) -> tuple[int, int]:
    """Seeds of a model's weight init and tether init. With a shared init every model starts
    from model 0's weights; tethers stay its own, so drift has something to push apart."""
    own = member_seed(seed, model)
    return (member_seed(seed, 0) if shared else own), own + 7919


def build_member(cfg, features: int, classes: int, model: int):
    """Model `model` of a job (cfg: the job's Config): its module and its tethers."""
    w_seed, t_seed = init_seeds(cfg.seed, model, cfg.model.init == "shared")
    torch.manual_seed(w_seed)  # as nn.Linear and nn.Conv2d draw their init
    module = build_module(cfg, features, classes)
    tethers = init_tethers(module, cfg.tether.init, cfg.tether.std, t_seed, cfg.model.tethered)
    return module, tethers
