"""k copies of one architecture as stacked tensors: one computation trains all k.

State is what `torch.func.stack_module_state` gives, keyed by the module's own parameter
names: every parameter as (k, ...) (trained), and beside it every tethered layer's tether
as (k, *weight.shape) (never trained). A forward pass computes each model's own batch with
its own W ⊙ T:

- any module: `vmap(functional_call)` over the stacked parameters (torch.func);
- the built-in MLP: the same function fused by hand, relu(baddbmm(b, W ⊙ T, x)) with the
  batch last, about 1.6x faster on a CPU at k = 8 (benchmarks/stacked.py measures both).

Models never mix: the loss is the sum of each model's mean loss, so each model's gradient
is its own, and Adam is elementwise, so its state is per model in effect.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ensemble.training.model import MLP


class Stack:
    """Stacked parameters and tethers of k members, and their forward pass."""

    def __init__(
        self,
        members: list[nn.Module],
        tethers: list[dict[str, torch.Tensor]],
        fused: bool | None = None,
    ):
        """members: k modules of one architecture; tethers: per member, layer -> tether.
        fused: use the hand-fused MLP forward (default: when the members are MLPs)."""
        if not members or len(members) != len(tethers):
            raise ValueError(f"{len(members)} members with {len(tethers)} tether sets")
        self.k = len(members)
        self.layers = list(tethers[0])  # tethered layers, forward order
        params, buffers = stack_module_state(members)  # name -> (k, ...)
        if buffers:
            raise ValueError(
                f"modules with buffers ({sorted(buffers)}) cannot be stacked yet: "
                "batch-norm running statistics are not supported"
            )
        self.params = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
        self.tethers = {n: torch.stack([t[n] for t in tethers]).float() for n in self.layers}
        for n in self.layers:
            w = self.params[f"{n}.weight"]
            assert self.tethers[n].shape == w.shape, (n, self.tethers[n].shape, w.shape)
        self.base = copy.deepcopy(members[0]).to("meta")
        is_mlp = isinstance(members[0], MLP)
        self.fused = is_mlp if fused is None else fused
        if self.fused and not is_mlp:
            raise ValueError("the fused forward is for the built-in MLP only")
        self._taps: list[torch.Tensor] = []
        self._hooks_on = False

    # --- state -----------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Stack:
        for n, p in self.params.items():
            self.params[n] = nn.Parameter(p.detach().to(device))
        self.tethers = {n: t.to(device) for n, t in self.tethers.items()}
        return self

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def weight(self, layer: str) -> nn.Parameter:
        return self.params[f"{layer}.weight"]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """layer -> the tether's (and weight's) shape for one model."""
        return {n: tuple(t.shape[1:]) for n, t in self.tethers.items()}

    def effective(self) -> dict[str, torch.Tensor]:
        """Every parameter as the forward pass uses it: weights of tethered layers as W ⊙ T."""
        out = dict(self.params)
        for n, t in self.tethers.items():
            out[f"{n}.weight"] = self.params[f"{n}.weight"] * t
        return out

    def rows(self, index) -> dict[str, torch.Tensor]:
        """Parameters and tethers of the models `index` (int or index tensor), as views or
        copies: keys are parameter names, and `tether.<layer>` for tethers."""
        out = {n: p.detach()[index] for n, p in self.params.items()}
        out.update({f"tether.{n}": t[index] for n, t in self.tethers.items()})
        return out

    @torch.no_grad()
    def set_rows(self, index, values: dict[str, torch.Tensor]) -> None:
        """Write rows back (as `rows` gives them), e.g. to undo a merge or roll back."""
        for key, v in values.items():
            if key.startswith("tether."):
                self.tethers[key.removeprefix("tether.")][index] = v
            else:
                self.params[key].data[index] = v

    def member_state(self, i: int) -> dict[str, np.ndarray]:
        """Model i's parameters under the module's keys, plus `tether.<layer>`; numpy copies."""
        return {k: v.cpu().numpy().copy() for k, v in self.rows(i).items()}

    # --- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, shared: bool = False, eff=None) -> torch.Tensor:
        """Logits (k, B, C). x: (k, B, ...), each model its own batch, or with shared=True
        (B, ...), one batch for all k."""
        return self.forward_taps(x, shared, eff, taps=False)[0]

    def forward_taps(
        self, x: torch.Tensor, shared: bool = False, eff=None, taps: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (k, B, C) and, per tethered layer, its representation (k, B, ...): the
        input of the next tethered layer (post-activation), and the logits for the last.
        These are what CKA compares and surge-collapse measures the entropy of."""
        eff = self.effective() if eff is None else eff
        if self.fused:
            return self._mlp(eff, x, shared)
        return self._func(eff, x, shared, taps)

    def _mlp(self, eff, x, shared: bool):
        """The MLP by hand: batch-last (k, in, B) keeps W's gradient in W's own (k, out, in)
        layout, so backward needs no strided copy."""
        names = self.layers
        xt = x.T.expand(self.k, *x.T.shape) if shared else x.mT  # (k, in, B), no copy
        taps = []
        for name in names[:-1]:
            w, b = eff[f"{name}.weight"], eff[f"{name}.bias"]
            xt = torch.relu(torch.baddbmm(b.unsqueeze(2), w, xt))  # (k, H, B)
            taps.append(xt.mT)
        last = names[-1]
        logits = torch.baddbmm(eff[f"{last}.bias"].unsqueeze(2), eff[f"{last}.weight"], xt).mT
        return logits, [*taps, logits]

    def _func(self, eff, x, shared: bool, taps: bool):
        """Any module: vmap of functional_call over the stacked parameters."""
        if taps and not self._hooks_on:
            mods = dict(self.base.named_modules())
            for name in self.layers[1:]:
                mods[name].register_forward_pre_hook(self._tap)
            self._hooks_on = True

        def one(params, xb):
            self._taps = []
            out = functional_call(self.base, params, (xb,))
            got, self._taps = tuple(self._taps) if taps else (), []
            return out, got

        logits, got = vmap(one, in_dims=(0, None if shared else 0))(eff, x)
        return logits, [*got, logits]

    def _tap(self, module, args):
        self._taps.append(args[0])


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per model mean cross-entropy: logits (k, B, C), y (k, B) or (B,) -> (k,)."""
    k, b, _ = logits.shape
    return F.cross_entropy(logits.mT, y.expand(k, b), reduction="none").mean(1)
