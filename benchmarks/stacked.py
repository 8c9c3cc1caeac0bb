"""Stacked training: how fast k models train as one computation, alone and inside a job.

In this process, one torch thread, the default MLP (64-64) on digits-sized batches of 32,
forward + cross-entropy + backward + Adam, model-steps per second side by side:
- the stack's two forward paths, the hand-fused MLP (baddbmm) and torch.func
  (vmap of functional_call, the path any module takes), against a Python loop over k
  separate modules (target for torch.func: >= 3x the loop at k = 8); and the same for a
  module of a user's, the examples' digits CNN (conv 8, conv 16, maxpool, Linear).

Inside a real Ray job, one worker training k models (k = 8 and 64), against the bare
stacked loop of the same models in this process (no Ray, no coordinator, no bookkeeping:
forward, loss, backward, Adam): the training phase's model-steps/s over the bare loop's
(target >= 0.8). Throughput counts training time only (each member's train_seconds, from
its first exchange to its test predictions), not Ray's start-up. Each k is measured with
coordination off (policy none), and with the default policy in both coordinator modes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import case, ratios, side_by_side, spread

SIZES = {
    "tiny": {"repeats": 1, "epochs": 1, "ks": [8], "step_ks": [8], "min_seconds": 0.01},
    "default": {"repeats": 2, "epochs": 10, "ks": [8, 64], "step_ks": [8, 64], "min_seconds": 0.3},
    "full": {"repeats": 3, "epochs": 20, "ks": [8, 64], "step_ks": [1, 8, 64], "min_seconds": 0.5},
}
JOBS = {  # name -> overrides on configs/all-data.yaml
    "none": ["policy.name=none"],
    "default, sync": ["coordinator.mode=sync"],
    "default, async": ["coordinator.mode=async"],
}
ROOT = Path(__file__).resolve().parents[1]


def step_fns(k: int, kind: str = "mlp") -> dict:
    """One training step of k 64-64 MLPs (three ways), or of k of the examples' digits CNN
    (a module of a user's: torch.func against the loop)."""
    from ensemble.training.model import init_tethers, mlp
    from ensemble.training.stack import Stack, cross_entropy

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(k, 32, 64, generator=gen), torch.randint(0, 10, (k, 32), generator=gen)
    if kind == "cnn":
        from examples.cnn_digits import cnn

        nets = []
        for i in range(k):
            torch.manual_seed(i)
            nets.append(cnn(64, 10, channels=8))
    else:
        nets = [mlp([64, 64, 64, 10], seed=i) for i in range(k)]
    tethers = [init_tethers(n, "normal", 0.1, seed=i) for i, n in enumerate(nets)]
    out = {}
    forms = (("torch.func", False),) if kind == "cnn" else (("fused", True), ("torch.func", False))
    for name, fused in forms:
        stack = Stack(nets, tethers, fused=fused)
        opt = torch.optim.Adam(stack.parameters(), lr=1e-3, fused=True)

        def step(stack=stack, opt=opt):
            opt.zero_grad(set_to_none=True)
            cross_entropy(stack.forward(x), y).sum().backward()
            opt.step()

        out[name] = step
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]

    def loop():
        for i, (net, opt) in enumerate(zip(nets, opts, strict=True)):
            eff = {
                p: w * tethers[i][p.removesuffix(".weight")] if p.endswith("weight") else w
                for p, w in net.named_parameters()
            }
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(torch.func.functional_call(net, eff, (x[i],)), y[i]).backward()
            opt.step()

    out["loop"] = loop
    return out


def bare_rate(k: int, epochs: int) -> float:
    """The same k models of the default job stepping in this process: the bare loop."""
    from ensemble.config import load_config
    from ensemble.runtime.job import make_trainer, prepare
    from ensemble.training.stack import cross_entropy

    prep = prepare(load_config(ROOT / "configs" / "all-data.yaml", [f"models.count={k}"]))
    t = make_trainer(prep, list(range(k)))  # its stack, optimiser and batches; not its loop
    b = prep.cfg.train.batch_size
    t0 = time.perf_counter()
    for _ in range(epochs):
        index = t.batches.epoch()
        for s in range(t.steps_per_epoch):
            idx = index[:, s * b : (s + 1) * b]
            t.opt.zero_grad(set_to_none=True)
            cross_entropy(t.stack.forward(t.x[idx]), t.y[idx]).sum().backward()
            t.opt.step()
    return k * epochs * t.steps_per_epoch / (time.perf_counter() - t0)


def job_rate(k: int, epochs: int, extra: list[str], root: Path, tag: str) -> dict:
    """Model-steps/s of a real job with one worker of k models: steps over training time."""
    from ensemble.config import load_config
    from ensemble.runtime.driver import run_job

    cfg = load_config(
        ROOT / "configs" / "all-data.yaml",
        [
            *extra,
            f"models.count={k}",
            f"resources.models_per_worker={k}",
            f"train.epochs={epochs}",
            f"job={tag}",
        ],
    )
    s = run_job(cfg, root / tag)
    ms = s["members"]
    rate = sum(m["steps"] for m in ms) / max(m["train_seconds"] for m in ms)
    return {
        "rate": rate,
        "blocked": max(m["blocked_fraction"] for m in ms),
        "merges": s["merges"],
        "rounds": s["rounds"],
    }


def run(size: str) -> tuple[list[dict], list[str], dict]:
    from benchmarks.common import local_ray

    local_ray()
    cfg = SIZES[size]
    cases, notes = [], []
    for k in cfg["step_ks"]:
        t = side_by_side(step_fns(k), cfg["repeats"] * 3, cfg["min_seconds"])
        for name in ("fused", "torch.func"):
            cases.append(
                case(
                    f"k={k}: {name} stack vs a Python loop over {k} modules",
                    "model-steps/s stack / loop",
                    ratios(t["loop"], t[name]),
                    (">=", 3.0) if name == "torch.func" and k == 8 else None,
                    stack_seconds=spread(t[name]),
                    loop_seconds=spread(t["loop"]),
                )
            )
        cases.append(
            case(
                f"k={k}: torch.func stack vs the fused MLP stack",
                "model-steps/s func / fused",
                ratios(t["fused"], t["torch.func"]),
            )
        )
        t = side_by_side(step_fns(k, "cnn"), cfg["repeats"] * 3, cfg["min_seconds"])
        cases.append(
            case(
                f"k={k}: torch.func stack of a user's CNN (examples/cnn_digits.py) vs a "
                f"Python loop over {k} of them",
                "model-steps/s stack / loop",
                ratios(t["loop"], t["torch.func"]),
                (">=", 3.0) if k == 8 else None,
                stack_seconds=spread(t["torch.func"]),
                loop_seconds=spread(t["loop"]),
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        for k in cfg["ks"]:
            runs: dict[str, list] = {name: [] for name in JOBS}
            bare = []
            for r in range(cfg["repeats"]):
                bare.append(bare_rate(k, cfg["epochs"]))
                for name, extra in JOBS.items():
                    tag = f"stacked-{k}-{name.replace(', ', '-')}-{r}"
                    runs[name].append(job_rate(k, cfg["epochs"], extra, Path(tmp), tag))
            for name, rs in runs.items():
                cases.append(
                    case(
                        f"k={k}, {name}: one {k}-model worker in a job vs the bare stacked loop",
                        "model-steps/s job / bare",
                        ratios([x["rate"] for x in rs], bare),
                        (">=", 0.8),
                        job=[round(x["rate"]) for x in rs],
                        bare=[round(b) for b in bare],
                        blocked_fraction=[round(x["blocked"], 3) for x in rs],
                        merges=[x["merges"] for x in rs],
                        rounds=[x["rounds"] for x in rs],
                    )
                )
    notes.append(
        f"digits, the default 64-64 MLP, batch 32, {cfg['epochs']} epochs per job. "
        "model-steps/s = all members' steps / the slowest member's training seconds. "
        "Stack vs loop ratios are loop seconds / stack seconds per k model-steps."
    )
    return cases, notes, cfg
