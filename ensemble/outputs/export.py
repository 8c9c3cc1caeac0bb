"""Members as plain PyTorch, and the ensemble consolidated into one model (a soup).

`folded(cfg, data shapes, state)`: a member's state dict with its tethers folded in
(W ⊙ T under the weight's own key): `load_state_dict` on a fresh module of the job's
architecture gives the member, with no import of this package.

`soup(...)`: one model from many. Members are first aligned to the best member (weight
matching on their tethered weights: hidden units of independently initialised models come
in different orders), then averaged. Greedy (Wortsman et al., model soups): in order of
validation accuracy, a member joins the soup only if the soup's validation accuracy does not
drop and its validation NLL does not rise (on a small validation split accuracy ties often:
accuracy alone let members in that cost test accuracy); uniform: all of them. Validation
data chooses; the test split only reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ensemble.config import Config
from ensemble.coordination import align
from ensemble.data.datasets import Dataset
from ensemble.outputs.evaluation import ensemble_probs, score
from ensemble.training.model import build_member, hidden_sizes, layer_names, tethered_layers

LOADING = """\
import json, torch
from safetensors.torch import load_file

m = json.load(open("manifest.json"))
net = torch.nn.Sequential()  # Linear layers under the manifest's names, ReLU between
for i, (name, a, b) in enumerate(zip(m["layers"], m["sizes"], m["sizes"][1:])):
    net.add_module(name, torch.nn.Linear(a, b))
    if i < len(m["layers"]) - 1:
        net.add_module(f"relu{i + 1}", torch.nn.ReLU())
net.load_state_dict(load_file(m["files"][0]))
pre = load_file("preprocess.safetensors")  # empty when the inputs were used raw
x = (x - pre["mean"]) / pre["std"] if pre else x  # x: (N, features) float32 tensor
probs = torch.softmax(net(x), dim=1)  # the ensemble: the mean over the members' probs
"""


def folded(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A saved member (module keys plus `tether.<layer>`) with W ⊙ T folded in: exactly the
    module's own keys."""
    out = {k: np.asarray(v) for k, v in state.items() if not k.startswith("tether.")}
    for key, t in state.items():
        if key.startswith("tether."):
            w = f"{key.removeprefix('tether.')}.weight"
            out[w] = (out[w] * t).astype(np.float32)
    return out


def manifest(cfg: Config, features: int, classes: int, files: list[str]) -> dict:
    """What a user needs to rebuild an exported model in plain PyTorch: its layers, in
    order, and how to feed it (see LOADING)."""
    common = {
        "features": features,
        "classes": classes,
        "inputs": "standardise raw inputs with preprocess.safetensors, (x - mean) / std, "
        "when it holds them",
        "files": files,
    }
    if cfg.model.factory is not None:  # the user's own module: its keys, its code
        return {
            "factory": cfg.model.factory,
            "options": cfg.model.options,
            **common,
            "loading": "net = factory(features, classes, **options); "
            "net.load_state_dict(safetensors.torch.load_file(file)); outputs are logits",
        }
    sizes = [features, *hidden_sizes(cfg.model.preset, cfg.model.layers), classes]
    return {
        "architecture": "mlp: Linear layers under these names, ReLU between them, none after "
        "the last; outputs are logits",
        "sizes": sizes,
        "layers": layer_names(len(sizes) - 1),
        "options": {},
        **common,
        "loading": LOADING,
    }


def module_of(cfg: Config, data: Dataset, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """A plain module of the job's architecture holding `weights` (folded: no tethers)."""
    module, _ = build_member(cfg, data.features, data.classes, 0)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return module.eval()


@torch.no_grad()
def probs_of(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return F.softmax(module(torch.from_numpy(np.ascontiguousarray(x))), dim=1).numpy()


def aligned_to(ref: dict, other: dict, layers: list[str]) -> dict[str, np.ndarray]:
    """`other` (folded) with its hidden units permuted into `ref`'s order (MLPs)."""
    a = {n: (ref[f"{n}.weight"], ref[f"{n}.bias"]) for n in layers}
    b = {n: (other[f"{n}.weight"], other[f"{n}.bias"]) for n in layers}
    perms = align.weight_matching(a, b)
    out = dict(other)
    for li, n in enumerate(layers):
        out[f"{n}.weight"] = align.permute(other[f"{n}.weight"], li, perms)
        out[f"{n}.bias"] = align.permute(other[f"{n}.bias"], li, perms)
    return out


def average(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.mean([s[k] for s in states], 0).astype(np.float32) for k in states[0]}


@dataclass(frozen=True)
class Soup:
    weights: dict[str, np.ndarray]  # the soup, folded: the module's own keys
    members: list[int]  # which members went in, best first
    report: dict  # val and test scores of the soup, the best member and the ensemble


def soup(
    cfg: Config,
    data: Dataset,
    states: dict[int, dict[str, np.ndarray]],
    greedy: bool = True,
    aligned: bool = True,
) -> Soup:
    """One model from the members `states` (model -> saved state, tethers unfolded)."""
    members = {m: folded(s) for m, s in states.items()}
    val = {
        m: score(probs_of(module_of(cfg, data, w), data.x_val), data.y_val)
        for m, w in members.items()
    }
    order = sorted(members, key=lambda m: (-val[m]["accuracy"], val[m]["nll"]))
    best = order[0]
    layers = tethered_layers(module_of(cfg, data, members[best]), cfg.model.tethered)
    if aligned:
        members = {
            m: w if m == best else aligned_to(members[best], w, layers) for m, w in members.items()
        }
    chosen, current = [best], val[best]
    for m in order[1:]:
        trial = average([members[i] for i in [*chosen, m]])
        s = score(probs_of(module_of(cfg, data, trial), data.x_val), data.y_val)
        if not greedy or (s["accuracy"] >= current["accuracy"] and s["nll"] <= current["nll"]):
            chosen, current = [*chosen, m], s
    weights = average([members[i] for i in chosen])
    test = {m: probs_of(module_of(cfg, data, members[m]), data.x_test) for m in members}
    report = {
        "soup": {
            "members": chosen,
            "val": current,
            "test": score(probs_of(module_of(cfg, data, weights), data.x_test), data.y_test),
        },
        "best_member": {"model": best, "val": val[best], "test": score(test[best], data.y_test)},
        "ensemble": {"test": score(ensemble_probs(list(test.values())), data.y_test)},
    }
    return Soup(weights, chosen, report)
