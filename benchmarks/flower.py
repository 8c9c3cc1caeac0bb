"""Flower's simulation engine vs our CLI job: FedAvg and FedAvgM on the same federated digits.

Off by default: it builds its own venv for Flower. Flower (`flwr[simulation]`, which pins
its own Ray) never enters the project's dependencies: the benchmark makes a separate venv
under ~/.cache/tether-ensemble/flwr-venv (or $FLOWER_VENV) with `pip install
flwr[simulation]==FLWR torch==2.13.0 numpy` and runs Flower there. Without the venv and no
way to build it (no network), or at --tiny size before it is built, it is skipped.

The task, identical on both sides:
- digits (sklearn's, standardised on the training split), 8 members / clients, each on its
  share of a Dirichlet(0.3) label-skewed split of the training rows: the shards our job
  draws (`ensemble.runtime.job.prepare` with configs/all-data.yaml and the overrides below). This
  process writes them, the test split and model 0's initial weights to one .npz; the
  Flower app reads only that file, so its venv needs flwr, torch and numpy alone;
- the same MLP (64-64, ReLU, 10 classes on 64 features), from model 0's initial weights
  (our `model.init: shared`; ours also carries each member's own tethers, W ⊙ T, T about
  N(1, 0.1), which Flower's plain MLP has not);
- the same local steps and batches: Adam lr 1e-3, batch 32, a round every K steps (K = 40
  at default and full size), all 8 clients every round, E epochs of ceil(n_train / 32)
  steps (ensemble.training.batches.steps_per_epoch, n_train the whole training split) = R rounds of
  K. Each client draws the very batches our member draws: its own rows' stream of
  shuffles from torch.Generator seeded member_seed(seed, m) (ensemble.training.batches.Batches);
- each client keeps its Adam state across rounds (Flower's Context.state), as our members
  keep theirs through merges;
- FedAvg: the plain mean (Flower weights by the examples each client trained on, equal
  here: K x 32 each); FedAvgM with server momentum 0.3 and server lr 1 (Flower's FedAvgM
  and our policy.momentum are the same update: v <- 0.3 v + (g - mean), g <- g - v).

Scores: the final global model of Flower, and our all-member ensemble (summary.json
`ensemble`: with FedAvg the members end equal), on the WHOLE test split, scored by
ensemble.outputs.evaluation.score on both sides. Wall: each side as a fresh process, imports, data
and Ray start and stop included (ours: `python -m ensemble.cli run ... --quiet`, which also
loads and partitions the data and validates each epoch; Flower's: its process reads the
.npz written beforehand), runs alternating (ours, Flower), (Flower, ours), ...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Skipped, case, ratios, spread

ROOT = Path(__file__).resolve().parents[1]
ALL_DATA = ROOT / "configs" / "all-data.yaml"
FLWR = "1.42.0"
REQUIREMENTS = [f"flwr[simulation]=={FLWR}", "torch==2.13.0", "numpy"]
VENV = Path(os.environ.get("FLOWER_VENV", Path.home() / ".cache" / "tether-ensemble" / "flwr-venv"))
# Flower's client_resources num_cpus (Flower's default is 2): 1.0, one ClientApp actor per core
CLIENT_CPUS = float(os.environ.get("FLOWER_CLIENT_CPUS", "1.0"))
TIMEOUT = 900  # seconds for one process of either side
MOMENTUM = {"fedavg": 0.0, "fedavgm": 0.3}
LR, BATCH, CLIENTS, ALPHA = 1e-3, 32, 8, 0.3
SIZES = {
    # k None: a round per epoch, so that a 2-epoch job has whole rounds
    "tiny": {"epochs": 2, "k": None, "strategies": ["fedavgm"], "repeats": 1, "install": False},
    "default": {"epochs": 20, "k": 40, "strategies": ["fedavg", "fedavgm"], "repeats": 1},
    "full": {"epochs": 20, "k": 40, "strategies": ["fedavg", "fedavgm"], "repeats": 3},
}
JOB = [
    "models.count=8",
    "model.layers=[64,64]",
    "data.partition=dirichlet",
    f"data.alpha={ALPHA}",
    f"train.batch_size={BATCH}",
    f"train.lr={LR}",
    "model.init=shared",
    "trigger.name=every_k_steps",
    "trigger.cooldown_steps=0",
]
NAMES = {"fedavg": "FedAvg", "fedavgm": "FedAvgM 0.3"}


# ---------------------------------------------------------------- the Flower venv


def flower_python(install: bool) -> Path:
    """The Flower venv's python: built once (install), then reused while it matches."""
    py, marker = VENV / "bin" / "python", VENV / ".tether-ready"
    want = " ".join(REQUIREMENTS)
    if py.is_file() and marker.is_file() and marker.read_text().strip() == want:
        return py
    if not install:
        raise Skipped(
            f"the Flower venv ({VENV}) is not built and this size never installs; "
            "`python -m benchmarks --only flower` builds it"
        )
    building = VENV.with_name(VENV.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    log = building.parent / "flwr-venv-pip.log"
    steps = [
        [sys.executable, "-m", "venv", str(building)],
        [str(building / "bin" / "python"), "-m", "pip", "install", "-q", *REQUIREMENTS],
    ]
    for cmd in steps:
        try:
            with open(log, "a") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
        except subprocess.TimeoutExpired:
            shutil.rmtree(building, ignore_errors=True)
            raise Skipped(f"building the Flower venv timed out: {' '.join(cmd)}") from None
        if rc.returncode:
            shutil.rmtree(building, ignore_errors=True)
            tail = [x for x in log.read_text().splitlines() if x.strip()][-1:]
            raise Skipped(
                f"could not build the Flower venv ({' '.join(cmd[-len(REQUIREMENTS) :])}: "
                f"exit {rc.returncode}; {tail[0] if tail else 'no output'}; see {log})"
            )
    probe = "import flwr, ray, torch; print(torch.__version__)"
    got = subprocess.run(
        [str(building / "bin" / "python"), "-c", probe], capture_output=True, text=True
    )
    if got.returncode or not got.stdout.strip().startswith("2.13.0"):
        shutil.rmtree(building, ignore_errors=True)
        raise Skipped(f"the Flower venv does not import as expected: {got.stderr[-300:]}")
    shutil.rmtree(VENV, ignore_errors=True)
    building.rename(VENV)
    # the venv's scripts name the folder they were made in: python itself is all we run
    (VENV / ".tether-ready").write_text(want + "\n")
    return py


def versions(py: Path) -> dict:
    probe = (
        "import json; from importlib import metadata as m; "
        "print(json.dumps({p: m.version(p) for p in ('flwr', 'ray', 'torch', 'numpy')}))"
    )
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def clean_env() -> dict:
    """A user's environment: the benchmarks' own Ray settings (auth off) taken out; Ray
    binds to the loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as our CLI sets itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


# ---------------------------------------------------------------- the shared split


def export_split(overrides: list[str], path: Path) -> dict:
    """Write our job's split (train rows of each member, the test split, model 0's init and
    the members' data seeds) to an .npz the Flower app reads. -> the job's shape."""
    import numpy as np

    from ensemble.config import load_config
    from ensemble.runtime.job import prepare
    from ensemble.training.model import build_member, member_seed

    prep = prepare(load_config(ALL_DATA, overrides))
    cfg, d = prep.cfg, prep.data
    module, _ = build_member(cfg, d.features, d.classes, 0)
    arrays = {
        "x_train": d.x_train,
        "y_train": d.y_train,
        "x_test": d.x_test,
        "y_test": d.y_test,
        "seeds": np.array([member_seed(cfg.seed, m) for m in range(cfg.models.count)]),
        "layers": np.array(module.names),
        **{f"rows_{m}": r for m, r in enumerate(prep.parts.train)},
        **{f"init/{k}": v.numpy() for k, v in module.state_dict().items()},
    }
    np.savez(path, **arrays)
    return {
        "n_train": len(d.y_train),
        "n_test": len(d.y_test),
        "steps_per_epoch": prep.steps_per_epoch,
        "shard_rows": [len(r) for r in prep.parts.train],
        "seed": cfg.seed,
    }


# ---------------------------------------------------------------- the two sides


def run_ours(overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "ensemble.cli", "run", str(ALL_DATA)]
    for o in overrides:
        cmd += ["--set", o]
    cmd += ["--quiet", "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"our CLI job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    accs = {(round(m["accuracy"], 9), round(m["nll"], 6)) for m in s["members"]}
    return {
        "wall": wall,
        "job_seconds": s["wall_seconds"],
        "ensemble": s["ensemble"],
        "rounds": s["rounds"],
        "merges": s["merges"],
        "steps": [m["steps"] for m in s["members"]],
        "members_equal": len(accs) == 1,
    }


def run_flower(py: Path, split: Path, out: Path, strategy: str, rounds: int, k: int) -> dict:
    import numpy as np

    from ensemble.outputs.evaluation import score

    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), "-m", "benchmarks.flower", "--flower-app", "--split", str(split)]
    cmd += ["--out", str(out), "--strategy", strategy, "--rounds", str(rounds)]
    cmd += ["--local-steps", str(k), "--cpus", str(CLIENT_CPUS)]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    wall = time.perf_counter() - t0
    (out / "flower.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"the Flower app failed ({proc.returncode}): {proc.stderr[-2000:]}")
    inner = json.loads((out / "flower.json").read_text())
    probs = np.load(out / "probs.npy")
    y = np.load(split)["y_test"]
    return {"wall": wall, "ensemble": score(probs, y), **inner}


def run(size: str) -> tuple[list[dict], list[str], dict]:
    cfg = SIZES[size]
    load = [round(x, 2) for x in os.getloadavg()]
    py = flower_python(cfg.get("install", True))
    vers = versions(py)
    runs: dict[str, dict[str, list[dict]]] = {s: {"ours": [], "flower": []} for s in MOMENTUM}
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        tmp = Path(tmp)
        split = tmp / "split.npz"
        shape = export_split(JOB, split)
        spe = shape["steps_per_epoch"]
        k = cfg["k"] or spe
        steps = cfg["epochs"] * spe
        if steps % k:
            raise RuntimeError(f"{cfg['epochs']} epochs of {spe} steps are not whole rounds of {k}")
        rounds = steps // k
        for r in range(cfg["repeats"]):
            for strategy in cfg["strategies"]:
                job = [*JOB, "policy.name=fedavg", f"policy.momentum={MOMENTUM[strategy]}"]
                job += [f"trigger.k={k}", f"train.epochs={cfg['epochs']}"]
                for who in ("ours", "flower") if r % 2 == 0 else ("flower", "ours"):
                    where = tmp / f"{who}-{strategy}-{r}"
                    if who == "ours":
                        got = run_ours(job, where)
                    else:
                        got = run_flower(py, split, where, strategy, rounds, k)
                    runs[strategy][who].append(got)
                    print(
                        f"flower bench: {strategy} {who} repeat {r}: {got['wall']:.1f} s, "
                        f"NLL {got['ensemble']['nll']:.4f}",
                        flush=True,
                    )

    def col(rs, *keys):
        out = []
        for x in rs:
            for key in keys:
                x = x[key]
            out.append(x)
        return out

    cases, notes = [], []
    for strategy in cfg["strategies"]:
        ours, fl = runs[strategy]["ours"], runs[strategy]["flower"]
        name = NAMES[strategy]
        cases += [
            case(
                f"{name}: process wall",
                "ours (CLI) / Flower (wall)",
                ratios(col(ours, "wall"), col(fl, "wall")),
                ("<=", 0.5),
                ours_seconds=spread(col(ours, "wall")),
                flower_seconds=spread(col(fl, "wall")),
                ours_job_seconds=spread(col(ours, "job_seconds")),
                flower_simulation_seconds=spread(col(fl, "simulation_seconds")),
                flower_import_seconds=spread(col(fl, "import_seconds")),
            ),
            case(
                f"{name}: global test NLL",
                "ours / Flower (NLL)",
                ratios(col(ours, "ensemble", "nll"), col(fl, "ensemble", "nll")),
                ("<=", 1.0) if strategy == "fedavgm" else None,
                ours=col(ours, "ensemble", "nll"),
                flower=col(fl, "ensemble", "nll"),
            ),
            case(
                f"{name}: global test accuracy",
                "ours / Flower (accuracy)",
                ratios(col(ours, "ensemble", "accuracy"), col(fl, "ensemble", "accuracy")),
                None,
                ours=col(ours, "ensemble", "accuracy"),
                flower=col(fl, "ensemble", "accuracy"),
            ),
        ]
        notes.append(
            f"{name}: ours rounds {col(ours, 'rounds')}, merges {col(ours, 'merges')}, "
            f"members equal at the end {col(ours, 'members_equal')}, steps per member "
            f"{sorted(set(sum(col(ours, 'steps'), [])))}; Flower rounds "
            f"{col(fl, 'rounds')}, local steps per client per round {k}."
        )
    notes = [
        f"Digits, Dirichlet({ALPHA}) over {CLIENTS} members/clients (training rows per member "
        f"{shape['shard_rows']}, {shape['n_train']} in all), MLP 64-64, Adam lr {LR}, "
        f"batch {BATCH}; {cfg['epochs']} epochs x {spe} steps (ceil({shape['n_train']}/"
        f"{BATCH})) = {steps} steps = {rounds} rounds of {k} local steps, all {CLIENTS} "
        f"clients every round; seed {shape['seed']} (member m's batches from seed "
        "member_seed(0, m) on both sides); global scores on the whole test split "
        f"({shape['n_test']} rows).",
        "Ours: `python -m ensemble.cli run configs/all-data.yaml` (the plain all-data digits "
        "config; the default job is the four-sites scenario, another task) with --set "
        + " ".join(JOB)
        + " policy.name=fedavg policy.momentum=<0 | 0.3> trigger.k=<K> train.epochs=<E> "
        "--quiet --run-dir <tmp>; trigger.poll_steps left at its default (10). The score is "
        "summary.json `ensemble` (the members are equal after the last round's merge).",
        f"Flower {vers['flwr']} (its Ray {vers['ray']}, torch {vers['torch']}) in its own "
        f"venv {VENV}: run_simulation with a message-API ServerApp (strategy.start) and "
        f"ClientApp, {CLIENTS} supernodes, client_resources num_cpus {CLIENT_CPUS} (1: one "
        "ClientApp actor per core, Flower's fastest here: 15.5-17.1 s a FedAvgM job against "
        "24.5-24.9 s with 0.25, 8 actors; Flower's default is 2 CPUs a client; "
        "$FLOWER_CLIENT_CPUS sets it), no client-side "
        "evaluation (fraction_evaluate 0); the final global model is scored once. Clients "
        "keep their Adam state across rounds in Context.state (as our members keep theirs).",
        "Differences left: our members are tethered MLPs (W ⊙ T, each member its own "
        "tethers, T ~ N(1, 0.1), averaged too) and validate every epoch; Flower's clients "
        "are plain MLPs and do not. Ours' wall includes loading and partitioning digits; "
        "Flower's process reads the split written beforehand (in its favour). FedAvgM's "
        "velocity: Flower's starts at round 1's move away from the initial model, ours at "
        "zero (it has no server model before round 1), so from round 2 on the targets "
        "differ by 0.3^(r-1) times that first move.",
        *notes,
    ]
    params = {
        **{key: v for key, v in cfg.items() if key != "install"},
        "k": k,
        "rounds": rounds,
        "steps": steps,
        "steps_per_epoch": spe,
        "clients": CLIENTS,
        "load_average_before": load,
        "alpha": ALPHA,
        "client_cpus": CLIENT_CPUS,
        "flower_versions": vers,
        "ours_overrides": JOB,
        "runs": {s: runs[s] for s in cfg["strategies"]},
    }
    return cases, notes, params


def write_report(res: dict, out: Path) -> None:
    """flower.md: the side-by-side table."""
    p = res["params"]
    lines = [
        "# Flower vs our CLI job (FedAvg, FedAvgM) on federated digits",
        "",
        f"Generated by `python -m benchmarks --only flower` ({res['size']} size, "
        f"{res['machine']['date']}, load average {p['load_average_before']} before the runs"
        f", {res['machine']['cores']} cores). Flower {p['flower_versions']['flwr']} with Ray "
        f"{p['flower_versions']['ray']}; ours with Ray {res['machine']['ray']}. "
        f"{p['steps']} steps per member = {p['rounds']} rounds of {p['k']}, 8 clients, "
        "median [min, max] over the repeats; wall is process wall (imports, Ray start and "
        "stop included).",
        "",
        "| strategy | ours wall s | Flower wall s | wall ours/Flower | ours NLL | Flower NLL "
        "| NLL ours/Flower | ours acc | Flower acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {c["case"]: c for c in res["cases"]}

    def rng(c):
        r = c["ratio"]
        return f"{r['median']:.3g} [{r['min']:.3g}, {r['max']:.3g}]"

    for strategy in p["strategies"]:
        name = NAMES[strategy]
        wall, nll, acc = (
            by[f"{name}: {x}"] for x in ("process wall", "global test NLL", "global test accuracy")
        )
        d, n, a = wall["details"], nll["details"], acc["details"]
        med = statistics.median
        lines.append(
            f"| {name} | {d['ours_seconds']['median']:.1f} | {d['flower_seconds']['median']:.1f} "
            f"| {rng(wall)} | {med(n['ours']):.4f} | {med(n['flower']):.4f} | {rng(nll)} "
            f"| {med(a['ours']):.4f} | {med(a['flower']):.4f} |"
        )
    lines += ["", "Targets: wall ours/Flower <= 0.5; FedAvgM NLL ours/Flower <= 1.0.", ""]
    lines += [f"- {note}" for note in res["notes"]]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "flower.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- the Flower app
# Runs in the Flower venv (`python -m benchmarks.flower --flower-app ...`): flwr, torch and
# numpy only. Everything it needs comes from the .npz export_split wrote.

_SPLITS: dict = {}


def _split(path: str) -> dict:
    import numpy as np

    if path not in _SPLITS:
        with np.load(path) as z:
            _SPLITS[path] = {key: z[key] for key in z.files}
    return _SPLITS[path]


def _mlp(d: dict):
    """Our MLP (ensemble.training.model.MLP): Linear layers named as ours, ReLU between."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self, names, shapes):
            super().__init__()
            self.names = list(names)
            for name in self.names:
                out_f, in_f = shapes[name]
                self.add_module(name, nn.Linear(in_f, out_f))

        def forward(self, x):
            for name in self.names[:-1]:
                x = torch.relu(getattr(self, name)(x))
            return getattr(self, self.names[-1])(x)

    names = [str(n) for n in d["layers"]]
    return MLP(names, {n: d[f"init/{n}.weight"].shape for n in names})


def _init_state(d: dict) -> dict:
    import torch

    return {k[5:]: torch.from_numpy(v.copy()) for k, v in d.items() if k.startswith("init/")}


def _rows(rows, seed: int, start: int, stop: int):
    """Rows [start, stop) of a member's stream of shuffles (ensemble.training.batches.Batches)."""
    import torch

    rows = torch.from_numpy(rows.astype("int64"))
    gen = torch.Generator().manual_seed(seed)
    parts, have = [], 0
    while have < stop:
        parts.append(rows[torch.randperm(len(rows), generator=gen)])
        have += len(rows)
    return torch.cat(parts)[start:stop]


def client_train(msg, context):
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    torch.set_num_threads(1)
    conf = msg.content["config"]
    d = _split(str(conf["split"]))
    m = int(context.node_config["partition-id"])
    rnd, steps, b = int(conf["server-round"]), int(conf["local-steps"]), int(conf["batch-size"])
    net = _mlp(d)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=float(conf["lr"]))
    if "adam" in context.state:  # this client's Adam moments from its last round
        saved = torch.load(io.BytesIO(context.state["adam"]["state"]), weights_only=False)
        opt.load_state_dict(saved)
    idx = _rows(d[f"rows_{m}"], int(d["seeds"][m]), (rnd - 1) * steps * b, rnd * steps * b)
    x, y = torch.tensor(d["x_train"]), torch.tensor(d["y_train"])
    net.train()
    for s in range(steps):
        batch = idx[s * b : (s + 1) * b]
        loss = F.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    context.state["adam"] = ConfigRecord({"state": buf.getvalue()})
    content = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"num-examples": steps * b, "train-loss": loss.item()}),
        }
    )
    return Message(content=content, reply_to=msg)


def flower_main(argv: list[str]) -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--flower-app", action="store_true")
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--strategy", choices=sorted(MOMENTUM), required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--local-steps", type=int, required=True)
    ap.add_argument("--cpus", type=float, default=CLIENT_CPUS)
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg, FedAvgM
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    t_import = time.perf_counter() - t0
    d = _split(a.split)
    found: dict = {}

    client = ClientApp()
    client.train()(client_train)
    server = ServerApp()

    @server.main()
    def main(grid, context):
        kw = {"fraction_train": 1.0, "fraction_evaluate": 0.0}
        kw |= {"min_train_nodes": CLIENTS, "min_available_nodes": CLIENTS}
        if MOMENTUM[a.strategy]:
            strategy = FedAvgM(**kw, server_learning_rate=1.0, server_momentum=MOMENTUM[a.strategy])
        else:
            strategy = FedAvg(**kw)
        conf = {"split": a.split, "lr": LR, "batch-size": BATCH, "local-steps": a.local_steps}
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(_init_state(d)),
            num_rounds=a.rounds,
            train_config=ConfigRecord(conf),
        )
        found["state"] = result.arrays.to_torch_state_dict()
        found["rounds"] = len(result.train_metrics_clientapp)

    t1 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=CLIENTS,
        backend_config={
            # a private instance: without an address, ray.init joins any cluster it finds
            "init_args": {"address": "local", "include_dashboard": False},
            "client_resources": {"num_cpus": a.cpus, "num_gpus": 0.0},
        },
    )
    t_sim = time.perf_counter() - t1
    if "state" not in found:
        raise SystemExit("the Flower ServerApp did not finish (see the log above)")
    net = _mlp(d)
    net.load_state_dict(found["state"])
    net.eval()
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(d["x_test"])), 1).numpy()
    a.out.mkdir(parents=True, exist_ok=True)
    np.save(a.out / "probs.npy", probs)
    (a.out / "flower.json").write_text(
        json.dumps(
            {
                "import_seconds": t_import,
                "simulation_seconds": t_sim,
                "rounds": found["rounds"],
                "strategy": a.strategy,
            }
        )
    )


if __name__ == "__main__":
    flower_main(sys.argv[1:])
