"""Ray Tune Population Based Training vs our job, on the same task. Needs the `bench` extra.

Both: digits from ensemble.data.load_dataset (same split), population / ensemble of 8,
20 epochs, 64-64 hidden, Adam lr 1e-3, batch 32, each on a fresh local Ray instance
(loopback, auth off), with the same CPU share per member so all 8 run at once.

- Ours: run_job with configs/all-data.yaml, the default job as a user runs it (tethered
  MLPs, coordination on, workers placed by resources.models_per_worker auto).
- PBT: a Tune function trainable trains a plain MLP, reports validation accuracy and a
  checkpoint each epoch; PBT (perturbation every few epochs) exploits the best quartile
  and perturbs lr. At the end, the final 8 trials' checkpoints predict the test set and
  their probabilities are averaged as an ensemble, as ours are.

Wall time is end-to-end for both: Ray start to Ray stop, including the final test
predictions. Runs alternate (ours, PBT), (PBT, ours), ...
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import PLAIN, Skipped, case, local_ray, ratios, spread
from benchmarks.tether_cost import plain_mlp

SIZES = {
    "tiny": {"population": 2, "epochs": 2, "hidden": [16, 16], "interval": 1, "repeats": 1},
    "default": {"population": 8, "epochs": 20, "hidden": [64, 64], "interval": 4, "repeats": 2},
    "full": {"population": 8, "epochs": 20, "hidden": [64, 64], "interval": 4, "repeats": 3},
}
LR, BATCH = 1e-3, 32


def train_member(config: dict, data) -> None:
    """Tune trainable: one plain MLP on digits; resumes from a (possibly exploited) checkpoint."""
    from ray import tune

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    model = plain_mlp(config["sizes"])
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    gen = torch.Generator().manual_seed(config["seed"])
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["epoch"]
    for group in opt.param_groups:  # PBT may have perturbed lr since the checkpoint
        group["lr"] = config["lr"]
    x, y = torch.tensor(data.x_train), torch.tensor(data.y_train)
    xv, yv = torch.tensor(data.x_val), torch.tensor(data.y_val)
    for epoch in range(start, config["epochs"]):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(xv)
            val_loss = float(F.cross_entropy(logits, yv))
            val_acc = float((logits.argmax(1) == yv).float().mean())
        with tempfile.TemporaryDirectory() as d:
            state = {"model": model.state_dict(), "opt": opt.state_dict()}
            torch.save({**state, "gen": gen.get_state(), "epoch": epoch + 1}, Path(d) / "state.pt")
            tune.report(
                {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1, "lr": config["lr"]},
                checkpoint=tune.Checkpoint.from_directory(d),
            )


def run_pbt(cfg: dict, data, cpus_per_member: float) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from ensemble.evaluation import ensemble_probs
    from ensemble.evaluation import score as scores

    sizes = [data.features, *cfg["hidden"], data.classes]
    t0 = time.perf_counter()
    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pbt-tune-") as storage:
            pbt = PopulationBasedTraining(
                time_attr="training_iteration",
                perturbation_interval=cfg["interval"],
                hyperparam_mutations={"lr": tune.loguniform(1e-4, 1e-2)},
            )
            trainable = tune.with_resources(
                tune.with_parameters(train_member, data=data), {"cpu": cpus_per_member}
            )
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "lr": LR,
                    "sizes": sizes,
                    "epochs": cfg["epochs"],
                    "seed": tune.grid_search(list(range(cfg["population"]))),
                },
                tune_config=tune.TuneConfig(
                    scheduler=pbt, metric="val_acc", mode="max", reuse_actors=True
                ),
                run_config=tune.RunConfig(
                    name="pbt",
                    storage_path=storage,
                    verbose=0,
                    stop={"training_iteration": cfg["epochs"]},
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=None
                    ),  # PBT exploits old ones
                    failure_config=tune.FailureConfig(fail_fast=True),
                ),
            )
            grid = tuner.fit()
            probs, lrs = [], []
            for res in grid:
                if res.error:
                    raise RuntimeError(f"PBT trial failed: {res.error}")
                with res.checkpoint.as_directory() as d:
                    state = torch.load(Path(d) / "state.pt", weights_only=False)
                net = plain_mlp(sizes)
                net.load_state_dict(state["model"])
                net.eval()
                with torch.no_grad():
                    probs.append(torch.softmax(net(torch.tensor(data.x_test)), 1).numpy())
                lrs.append(res.config["lr"])
    finally:
        ray.shutdown()
    members = [scores(p, data.y_test) for p in probs]
    return {
        "wall": time.perf_counter() - t0,
        "ensemble": scores(ensemble_probs(probs), data.y_test),
        "mean_member_accuracy": float(np.mean([m["accuracy"] for m in members])),
        "final_lrs": lrs,
    }


def run_ours(cfg: dict, job: str, root: Path) -> dict:
    from ensemble.config import load_config
    from ensemble.driver import run_job

    hidden = ",".join(map(str, cfg["hidden"]))
    overrides = [f"models.count={cfg['population']}", f"train.epochs={cfg['epochs']}"]
    overrides += [f"model.layers=[{hidden}]", f"train.lr={LR}", f"train.batch_size={BATCH}"]
    t0 = time.perf_counter()
    default = Path(__file__).resolve().parents[1] / "configs" / "all-data.yaml"
    summary = run_job(load_config(default, [*overrides, f"job={job}"]), root / job)
    return {
        "wall": time.perf_counter() - t0,
        "ensemble": summary["ensemble"],
        "mean_member_accuracy": summary["mean_member"]["accuracy"],
        "merges": summary["merges"],
        "drifts": summary["drifts"],
    }


def run(size: str) -> tuple[list[dict], list[str], dict]:
    try:
        import ray.tune  # noqa: F401
    except ImportError as e:
        raise Skipped(f"ray.tune is not importable ({e}); pip install -e '.[bench]'") from None
    local_ray()
    from ensemble.config import load_config
    from ensemble.data import load_dataset

    cfg = SIZES[size]
    base = load_config(None, PLAIN)
    data = load_dataset(base.data, base.seed)  # the split our job uses
    per = min(1.0, int(os.cpu_count() / cfg["population"] * 100) / 100)  # as worker_cpus()
    runs: dict[str, list[dict]] = {"ours": [], "pbt": []}
    with tempfile.TemporaryDirectory(prefix="bench-pbt-") as tmp:
        for r in range(cfg["repeats"]):
            for who in ("ours", "pbt") if r % 2 == 0 else ("pbt", "ours"):
                if who == "ours":
                    runs[who].append(run_ours(cfg, f"pbt-ours-{r}", Path(tmp)))
                else:
                    runs[who].append(run_pbt(cfg, data, per))
    ours, pbt = runs["ours"], runs["pbt"]

    def col(rs, *keys):
        out = []
        for x in rs:
            for k in keys:
                x = x[k]
            out.append(x)
        return out

    cases = [
        case(
            "end-to-end wall",
            "ours / PBT (wall)",
            ratios(col(ours, "wall"), col(pbt, "wall")),
            ("<=", 0.5),
            ours_seconds=spread(col(ours, "wall")),
            pbt_seconds=spread(col(pbt, "wall")),
        ),
        case(
            "ensemble test accuracy",
            "ours / PBT (accuracy)",
            ratios(col(ours, "ensemble", "accuracy"), col(pbt, "ensemble", "accuracy")),
            (">=", 1.0),
            ours=col(ours, "ensemble", "accuracy"),
            pbt=col(pbt, "ensemble", "accuracy"),
        ),
        case(
            "ensemble test NLL",
            "ours / PBT (NLL)",
            ratios(col(ours, "ensemble", "nll"), col(pbt, "ensemble", "nll")),
            ("<=", 1.0),
            ours=col(ours, "ensemble", "nll"),
            pbt=col(pbt, "ensemble", "nll"),
        ),
    ]
    notes = [
        f"Population {cfg['population']}, {cfg['epochs']} epochs, hidden {cfg['hidden']}, "
        f"Adam lr {LR}, batch {BATCH}; {per} CPU per member (trial or worker) on "
        f"{os.cpu_count()} CPUs. PBT: perturbation every {cfg['interval']} epochs, lr "
        "resampled log-uniform in [1e-4, 1e-2] or scaled by 0.8/1.2, metric val_acc.",
        "PBT members are plain MLPs; ours are tethered MLPs with the default policy.",
        f"Mean member test accuracy: ours {col(ours, 'mean_member_accuracy')}, "
        f"PBT {col(pbt, 'mean_member_accuracy')}.",
        f"Ours: merges {col(ours, 'merges')}, drifts {col(ours, 'drifts')}. "
        f"PBT final lrs: {[[f'{x:.2g}' for x in lrs] for lrs in col(pbt, 'final_lrs')]}.",
    ]
    return cases, notes, {**cfg, "cpus_per_member": per}
