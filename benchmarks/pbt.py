"""Ray Tune Population Based Training vs our job, on the same task. Needs the `bench` extra.

Both: digits from ensemble.data.load_dataset (same split), population / ensemble of 8,
20 epochs, 64-64 hidden, Adam lr 1e-3, batch 32, each on a fresh local Ray instance
(loopback), with the same CPU share per member so all 8 run at once.

The task is configs/all-data.yaml's: every member on all of the digits. The project's
default job (configs/default.yaml) is another task now, the four scanning sites, so it is
not the one PBT is compared against.

- Ours, in process: run_job with configs/all-data.yaml and the overrides below (tethered
  MLPs, the default policy, coordination on, workers placed by resources.models_per_worker
  auto), Ray auth off.
- Ours through the CLI, as a user runs it: a fresh process `python -m ensemble.cli run
  configs/all-data.yaml --set ... --quiet --run-dir <tmp>` with the same overrides, in the
  user's environment (the CLI's own Ray settings, token auth on); its wall is the
  process's: Python and torch imports, data, Ray start and stop.
- PBT: a Tune function trainable trains a plain MLP, reports validation accuracy and a
  checkpoint each epoch; PBT (perturbation every few epochs) exploits the best quartile
  and perturbs lr. At the end, the final 8 trials' checkpoints predict the test set and
  their probabilities are averaged as an ensemble, as ours are.

- PBT in a fresh process too (`python -m benchmarks.pbt --process ...`: imports, data,
  Ray, Tune and the test predictions), the like-for-like peer of the CLI's wall.

In-process wall time is end-to-end for both: Ray start to Ray stop, including the final
test predictions. Each repeat runs all four, the order reversed every other repeat:
(ours, CLI, PBT, PBT process), (PBT process, PBT, CLI, ours), ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Skipped, case, local_ray, ratios, spread
from benchmarks.tether_cost import plain_mlp

SIZES = {
    "tiny": {"population": 2, "epochs": 2, "hidden": [16, 16], "interval": 1, "repeats": 1},
    "default": {"population": 8, "epochs": 20, "hidden": [64, 64], "interval": 4, "repeats": 2},
    "full": {"population": 8, "epochs": 20, "hidden": [64, 64], "interval": 4, "repeats": 3},
}
LR, BATCH = 1e-3, 32
ROOT = Path(__file__).resolve().parents[1]
ALL_DATA = ROOT / "configs" / "all-data.yaml"  # the task: every member on all of digits
TIMEOUT = 900  # seconds for one process


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

    from ensemble.outputs.evaluation import ensemble_probs
    from ensemble.outputs.evaluation import score as scores

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


def ours_overrides(cfg: dict) -> list[str]:
    """Our job's --set overrides on configs/all-data.yaml, in process and through the CLI."""
    hidden = ",".join(map(str, cfg["hidden"]))
    overrides = [f"models.count={cfg['population']}", f"train.epochs={cfg['epochs']}"]
    return overrides + [f"model.layers=[{hidden}]", f"train.lr={LR}", f"train.batch_size={BATCH}"]


def run_ours(cfg: dict, job: str, root: Path) -> dict:
    from ensemble.config import load_config
    from ensemble.runtime.driver import run_job

    t0 = time.perf_counter()
    summary = run_job(load_config(ALL_DATA, [*ours_overrides(cfg), f"job={job}"]), root / job)
    return {
        "wall": time.perf_counter() - t0,
        "ensemble": summary["ensemble"],
        "mean_member_accuracy": summary["mean_member"]["accuracy"],
        "merges": summary["merges"],
        "drifts": summary["drifts"],
    }


def user_env() -> dict:
    """The environment a user's shell has: without the benchmarks' Ray settings (auth off)."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}


def run_cli(cfg: dict, root: Path) -> dict:
    """Our job as a user runs it: a fresh `python -m ensemble.cli run` process."""
    cmd = [sys.executable, "-m", "ensemble.cli", "run", str(ALL_DATA)]
    for o in ours_overrides(cfg):
        cmd += ["--set", o]
    cmd += ["--quiet", "--run-dir", str(root)]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"the CLI job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((root / "summary.json").read_text())
    return {
        "wall": wall,
        "job_seconds": summary["wall_seconds"],
        "ensemble": summary["ensemble"],
        "mean_member_accuracy": summary["mean_member"]["accuracy"],
        "merges": summary["merges"],
        "drifts": summary["drifts"],
    }


def run_pbt_process(size: str, out: Path) -> dict:
    """PBT in a fresh process (`python -m benchmarks.pbt --process`), timed as a process."""
    cmd = [sys.executable, "-m", "benchmarks.pbt", "--process", size, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"the PBT process failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {**json.loads(out.read_text()), "wall": wall}


def pbt_process_main(argv: list[str]) -> None:
    """The PBT process: what a user's Tune script does, end to end, then its result."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--process", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    local_ray()
    from ensemble.config import load_config
    from ensemble.data.datasets import load_dataset

    cfg = SIZES[a.process]
    base = load_config(ALL_DATA)
    data = load_dataset(base.data, base.seed)
    got = run_pbt(cfg, data, cpus_per_member(cfg))
    got["inner_wall"] = got.pop("wall")  # ray.init to shutdown; the parent times the process
    a.out.write_text(json.dumps(got))


def cpus_per_member(cfg: dict) -> float:
    return min(1.0, int(os.cpu_count() / cfg["population"] * 100) / 100)  # as worker_cpus()


def run(size: str) -> tuple[list[dict], list[str], dict]:
    try:
        import ray.tune  # noqa: F401
    except ImportError as e:
        raise Skipped(f"ray.tune is not importable ({e}); pip install -e '.[bench]'") from None
    local_ray()
    from ensemble.config import load_config
    from ensemble.data.datasets import load_dataset

    cfg = SIZES[size]
    load = [round(x, 2) for x in os.getloadavg()]
    base = load_config(ALL_DATA)
    data = load_dataset(base.data, base.seed)  # the split our job uses
    per = cpus_per_member(cfg)
    order = ["ours", "cli", "pbt", "pbt_process"]
    runs: dict[str, list[dict]] = {who: [] for who in order}
    with tempfile.TemporaryDirectory(prefix="bench-pbt-") as tmp:
        for r in range(cfg["repeats"]):
            for who in order if r % 2 == 0 else reversed(order):
                if who == "ours":
                    runs[who].append(run_ours(cfg, f"pbt-ours-{r}", Path(tmp)))
                elif who == "cli":
                    runs[who].append(run_cli(cfg, Path(tmp) / f"pbt-cli-{r}"))
                elif who == "pbt":
                    runs[who].append(run_pbt(cfg, data, per))
                else:
                    runs[who].append(run_pbt_process(size, Path(tmp) / f"pbt-process-{r}.json"))
    ours, pbt, cli, pbt_proc = runs["ours"], runs["pbt"], runs["cli"], runs["pbt_process"]

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
            "CLI end-to-end wall",
            "ours CLI process / PBT process (wall)",
            ratios(col(cli, "wall"), col(pbt_proc, "wall")),
            ("<=", 0.5),
            cli_seconds=spread(col(cli, "wall")),
            cli_job_seconds=spread(col(cli, "job_seconds")),
            pbt_process_seconds=spread(col(pbt_proc, "wall")),
            pbt_process_inner_seconds=spread(col(pbt_proc, "inner_wall")),
        ),
        case(
            "CLI vs in-process PBT wall",
            "ours CLI process / PBT in process (wall)",
            ratios(col(cli, "wall"), col(pbt, "wall")),
            None,
            cli_seconds=spread(col(cli, "wall")),
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
        "Task: configs/all-data.yaml (every member on all of digits; the default job, "
        "configs/default.yaml, is the four-sites scenario, not PBT's task) with --set "
        + " ".join(ours_overrides(cfg))
        + ". The CLI case runs it as `python -m ensemble.cli run configs/all-data.yaml --set "
        "... --quiet --run-dir <tmp>` in a fresh process (user environment, token auth on); "
        "PBT process: `python -m benchmarks.pbt --process <size>` (imports, data, Ray, Tune, "
        "test predictions). Both walls are process walls.",
        f"CLI: wall {[round(x, 1) for x in col(cli, 'wall')]} s, of which the job "
        f"(summary.json wall_seconds) {[round(x, 1) for x in col(cli, 'job_seconds')]} s; "
        f"ensemble test accuracy {col(cli, 'ensemble', 'accuracy')}, NLL "
        f"{[round(x, 4) for x in col(cli, 'ensemble', 'nll')]}; merges {col(cli, 'merges')}. "
        f"PBT process: wall {[round(x, 1) for x in col(pbt_proc, 'wall')]} s, of which "
        f"ray.init to shutdown {[round(x, 1) for x in col(pbt_proc, 'inner_wall')]} s; "
        f"ensemble accuracy {col(pbt_proc, 'ensemble', 'accuracy')}.",
    ]
    return cases, notes, {**cfg, "cpus_per_member": per, "load_average_before": load}


if __name__ == "__main__":
    pbt_process_main(sys.argv[1:])
