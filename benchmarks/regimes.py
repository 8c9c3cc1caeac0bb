"""Does compatibility pay? The regimes study (issue 20): policies × regimes × seeds.

Each (regime, row, seed) is one whole job in one process (every member one stack, the
synchronous protocol `ensemble.runtime.job.drive`, which a Ray job in `coordinator.mode: sync`
reproduces), except IFCA, whose reference implementation drives the stack itself
(benchmarks/ifca.py). Every row runs the same population: 8 members of 64-64 from one
shared init, 24 epochs of batch 32 (816 steps on digits), a round every 40 steps.

Regimes (a dataset and how its members differ):
- R1: 4 groups, inputs rotated g·90° (digits), each member a disjoint shard;
- R2: 4 groups, labels permuted per group (digits), shards;
- R3: Dirichlet(0.3) label skew (digits);
- R4: IID shards (digits);
- R5: every member on all the data (digits);
- R6: 2 groups, labels permuted (breast_cancer: the second dataset), shards;
- R7: 4 groups with permuted labels and Dirichlet(0.3) label skew together (digits);
- held out, never tuned on: wine, iris and a generated set (`classification`), each with
  the label-permutation (2 groups), label-skew, IID-shard and all-data regimes.

Rows: local-only (`none`), FedAvg, FedAvgM 0.3, the oracle (FedAvg within the true
groups; where the data define none, FedAvg itself), IFCA k=4 (reference), FedAMP σ=5, and
the default (`policy.name: auto`, gravity) with its settings as shipped. Scores are
personal (each member on its own test rows, through its group's shift; the mean over
members) unless they say global (the all-member ensemble on the global test split); ARI
of the groups a policy found against the data's. Paired by seed: the same seed gives every
row the same split, partition, shift and init.

Environment: REGIMES_PROCS (default 2) processes; REGIMES_ONLY (comma-separated regime
names) and REGIMES_ROWS restrict the table; REGIMES_SEEDS overrides the number of seeds.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.common import case, layered
from benchmarks.quality import _stat

COMMON = [
    "models.count=8",
    "model.layers=[64, 64]",
    "train.epochs=24",
    "train.batch_size=32",
    "model.init=shared",
    "trigger.name=every_k_steps",  # a round every 40 steps, for every row
    "trigger.k=40",
    "trigger.cooldown_steps=0",
]
SHARDS = ["data.partition=shard"]
SKEW = ["data.partition=dirichlet", "data.alpha=0.3"]
REGIMES: dict[str, tuple[str, list[str]]] = {
    "R1 rotated groups": ("digits", ["data.groups=4", "data.shift=rotate", *SHARDS]),
    "R2 label maps": ("digits", ["data.groups=4", "data.shift=permute_labels", *SHARDS]),
    "R3 label skew": ("digits", SKEW),
    "R4 IID shards": ("digits", SHARDS),
    "R5 all data": ("digits", ["data.partition=iid"]),
    "R6 label maps, 2nd dataset": (
        "breast_cancer",
        ["data.groups=2", "data.shift=permute_labels", *SHARDS],
    ),
    "R7 label maps x skew": ("digits", ["data.groups=4", "data.shift=permute_labels", *SKEW]),
}
HELD_OUT = ("wine", "iris", "classification")
for _d in HELD_OUT:
    REGIMES[f"{_d}: label maps"] = (_d, ["data.groups=2", "data.shift=permute_labels", *SHARDS])
    REGIMES[f"{_d}: label skew"] = (_d, ["data.partition=dirichlet", "data.alpha=1.0"])
    REGIMES[f"{_d}: IID shards"] = (_d, SHARDS)
    REGIMES[f"{_d}: all data"] = (_d, ["data.partition=iid"])
TUNING = ("R1 rotated groups", "R3 label skew")  # what chose the default's settings

IFCA = "IFCA k=4"
ROWS: dict[str, list[str]] = {
    "local-only": ["policy.name=none"],
    # a deep ensemble: members trained alone from their own inits (the others share one)
    "deep ensemble": ["policy.name=none", "model.init=independent"],
    "FedAvg": ["policy.name=fedavg"],
    "FedAvgM 0.3": ["policy.name=fedavg", "policy.momentum=0.3"],
    "oracle": ["policy.name=fedavg", "policy.within=groups"],
    IFCA: ["policy.name=none", "model.init=independent"],  # k inits; benchmarks/ifca.py
    "FedAMP σ=5": ["policy.name=fedamp", "policy.sigma=5"],
    "default (gravity)": ["policy.name=auto"],
}
DEFAULT = "default (gravity)"
SIZES = {
    "tiny": {"seeds": 1, "regimes": ["R2 label maps"], "set": ["train.epochs=2"]},
    "default": {"seeds": 3, "regimes": list(REGIMES)[:7], "set": []},
    "full": {"seeds": 10, "regimes": list(REGIMES), "set": []},
}


def _env_list(name: str, known: list[str]) -> list[str] | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"{name}: unknown {bad}; choose from {known}")
    return names


def plan(size: str) -> dict:
    s = SIZES[size]
    regimes = _env_list("REGIMES_ONLY", list(REGIMES)) or s["regimes"]
    rows = _env_list("REGIMES_ROWS", list(ROWS)) or list(ROWS)
    seeds = int(os.environ.get("REGIMES_SEEDS") or s["seeds"])
    return {
        "regimes": regimes,
        "rows": rows,
        "seeds": list(range(seeds)),
        "set": s["set"],
        "processes": max(1, int(os.environ.get("REGIMES_PROCS") or 2)),
    }


# ---------------------------------------------------------------- one run
def overrides(regime: str, row: str, seed: int, extra: list[str]) -> list[str]:
    dataset, how = REGIMES[regime]
    job = f"rg-{abs(hash((regime, row))) % 10**8}-s{seed}"
    return layered(
        COMMON, how, ROWS[row], extra, [f"data.name={dataset}", f"seed={seed}", f"job={job}"]
    )


def run_one(task: tuple[str, str, int, list[str]]) -> dict:
    """One job, scored; an exception becomes {'error': ...}."""
    regime, row, seed, extra = task
    out: dict = {"regime": regime, "row": row, "seed": seed}
    t0 = time.perf_counter()
    try:
        out |= train_and_score(overrides(regime, row, seed, extra), row == IFCA)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        out["traceback"] = traceback.format_exc()[-3000:]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def train_and_score(over: list[str], ifca: bool) -> dict:
    import torch

    from benchmarks import ifca as reference
    from ensemble.config import load_config
    from ensemble.data.groups import true_groups
    from ensemble.outputs.evaluation import ari, population
    from ensemble.runtime.job import drive, make_trainer, open_coordinator, prepare

    torch.set_num_threads(1)
    prep = prepare(load_config(None, over))
    cfg = prep.cfg
    counts = {"merges": 0, "drifts": 0, "rounds": 0}
    if ifca:
        t, chosen = reference.train(prep, clusters=4, every=40)
        last = chosen[-1]
        found = [np.flatnonzero(last == c).tolist() for c in np.unique(last)]
    else:
        with tempfile.TemporaryDirectory(prefix="bench-regimes-") as tmp:
            coord = open_coordinator(prep, Path(tmp))
            try:
                t = make_trainer(prep, list(range(cfg.models.count)))
                drive([t], coord)
            finally:
                coord.history.close()
        found = coord.groups
        counts = {"merges": coord.merges, "drifts": coord.drifts, "rounds": coord.rounds}
    live = np.flatnonzero(~t.failed)
    test = t.predict_proba(prep.data.x_test)
    probs = {int(m): test[m] for m in live}
    s = population(probs, prep.data.y_test, {m: prep.parts.test[m] for m in probs})
    truth = true_groups(cfg.models.count, cfg.data.groups)
    return {
        "personal_acc": s["personal"]["accuracy"],
        "personal_nll": s["personal"]["nll"],
        "global_acc": s["ensemble"]["accuracy"],
        "global_nll": s["ensemble"]["nll"],
        "groups_found": found,
        "ari": None if not (truth and found) else ari(found, truth),
        "policy": cfg.policy.name,
        **counts,
    }


def _init() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(p: dict) -> list[dict]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    tasks = [(r, row, s, p["set"]) for s in p["seeds"] for r in p["regimes"] for row in p["rows"]]
    procs = min(p["processes"], len(tasks))
    cols = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    out = []
    with Progress(*cols, console=Console(stderr=True)) as bar:
        job = bar.add_task(f"regimes: {len(tasks)} runs on {procs} processes", total=len(tasks))
        pool = mp.get_context("spawn").Pool(procs, initializer=_init) if procs > 1 else None
        results = pool.imap_unordered(run_one, tasks) if pool else map(run_one, tasks)
        try:
            for r in results:
                out.append(r)
                what = r.get("error") or f"personal NLL {r['personal_nll']:.4f}"
                bar.console.log(f"{r['regime']} / {r['row']} / seed {r['seed']}: {what}")
                bar.advance(job)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return out


# ---------------------------------------------------------------- summary
METRICS = ("personal_nll", "personal_acc", "global_nll", "global_acc", "ari", "merges", "drifts")


def summarise(runs: list[dict], p: dict) -> dict:
    """regime -> row -> metric -> {mean, sd, values (by seed)}; errors listed."""
    table: dict = {}
    for regime in p["regimes"]:
        table[regime] = {}
        for row in p["rows"]:
            mine = sorted(
                (r for r in runs if r["regime"] == regime and r["row"] == row),
                key=lambda r: r["seed"],
            )
            ok = [r for r in mine if "error" not in r]
            cell: dict = {"n": len(ok), "errors": [r["error"] for r in mine if "error" in r]}
            for k in METRICS:
                xs = [r[k] for r in ok if r.get(k) is not None]
                if xs:
                    cell[k] = _stat(xs)
            cell["seeds"] = [r["seed"] for r in ok]
            table[regime][row] = cell
    return table


def paired(table: dict, regime: str, a: str, b: str, key: str = "personal_nll") -> list[float]:
    """Per-seed ratios a / b of one metric (seeds both rows ran)."""
    x, y = table[regime].get(a, {}), table[regime].get(b, {})
    if key not in x or key not in y:
        return []
    xs = dict(zip(x["seeds"], x[key]["values"], strict=True))
    ys = dict(zip(y["seeds"], y[key]["values"], strict=True))
    return [xs[s] / ys[s] for s in sorted(set(xs) & set(ys)) if ys[s]]


def targets(table: dict) -> list[dict]:
    """The issue's targets on the default row, as cases (paired ratios by seed)."""
    out = []
    d = DEFAULT

    def add(regime, name, other, bound, key="personal_nll", op="<="):
        if regime in table and d in table[regime] and other in table[regime]:
            r = paired(table, regime, d, other, key)
            if r:
                what = f"{key.replace('_', ' ')}: {d} / {other}, paired by seed"
                out.append(case(f"{regime}: vs {other}", what, r, (op, bound), regime=regime))

    for regime in ("R1 rotated groups", "R2 label maps"):
        add(regime, "", "FedAvg", 0.5)
        add(regime, "", IFCA, 1.0, op="<")
        add(regime, "", "FedAMP σ=5", 1.0, op="<")
        add(regime, "", "oracle", 1.05)
        cell = table.get(regime, {}).get(d, {})
        if "ari" in cell:
            out.append(
                case(
                    f"{regime}: ARI", "ARI of the groups found", cell["ari"]["values"], (">=", 0.9)
                )
            )
    add("R3 label skew", "", "FedAvgM 0.3", 1.0, op="<")
    add("R3 label skew", "", "FedAMP σ=5", 1.0, op="<")
    add("R3 label skew", "", "FedAvgM 0.3", 1.0, key="personal_acc", op=">=")
    add("R4 IID shards", "", "FedAvg", 1.05)
    add("R5 all data", "", "local-only", 1.02)
    add("R5 all data", "", "local-only", 1.02, key="global_nll")
    add("R5 all data", "", "deep ensemble", 1.02, key="global_nll")  # independent inits
    return out


def run(size: str):
    p = plan(size)
    runs = run_all(p)
    table = summarise(runs, p)
    cases = targets(table)
    errors = sorted({r["error"] for r in runs if "error" in r})
    notes = [f"{len(runs)} runs; {len(errors)} distinct errors"] + errors[:5]
    params = {**p, "common": COMMON, "rows_overrides": ROWS, "table": table, "tuning": TUNING}
    return cases, notes, params


def _fmt(cell: dict, key: str, digits: int = 3) -> str:
    if key not in cell:
        return "—"
    m, sd = cell[key]["mean"], cell[key]["sd"]
    return f"{m:.{digits}f}" + (
        f" ± {sd:.{digits}f}" if sd is not None and not math.isnan(sd) else ""
    )


def markdown(res: dict) -> str:
    p = res["params"]
    table = p["table"]
    rows = p["rows"]
    lines = [
        "# The regimes study: does compatibility pay?",
        "",
        f"{len(p['seeds'])} seeds, paired. Personal scores: each member on its own test rows "
        "through its group's shift, the mean over members (accuracy / NLL). Global: the "
        "all-member ensemble on the whole test split. Tuned on: "
        + ", ".join(p["tuning"])
        + " (with other seeds); every other regime is held out.",
        "",
        "| regime | " + " | ".join(rows) + " |",
        "| --- |" + " --- |" * len(rows),
    ]
    for regime, cells in table.items():
        best = (
            min((cells[r]["personal_nll"]["mean"], r) for r in rows if "personal_nll" in cells[r])[
                1
            ]
            if any("personal_nll" in cells[r] for r in rows)
            else None
        )
        parts = []
        for r in rows:
            c = cells[r]
            if "personal_nll" not in c:
                parts.append("error" if c["errors"] else "—")
                continue
            text = f"{c['personal_acc']['mean']:.3f} / {c['personal_nll']['mean']:.3f}"
            parts.append(f"**{text}**" if r == best else text)
        lines.append(f"| {regime} | " + " | ".join(parts) + " |")
    lines += ["", "Global (all-member ensemble) NLL and the groups found (ARI, default row):", ""]
    lines += [
        "| regime | " + " | ".join(rows) + " | ARI (default) |",
        "| --- |" + " --- |" * (len(rows) + 1),
    ]
    for regime, cells in table.items():
        parts = [_fmt(cells[r], "global_nll") for r in rows]
        lines.append(
            f"| {regime} | " + " | ".join(parts) + f" | {_fmt(cells.get(DEFAULT, {}), 'ari', 2)} |"
        )
    lines += ["", "Targets (paired ratios, median over seeds):", ""]
    for c in res["cases"]:
        r = c["ratio"]
        t = c["target"]
        lines.append(
            f"- {c['case']}: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}), "
            f"target {t['op']} {t['value']}: {'met' if c['met'] else 'MISSED'}"
        )
    return "\n".join(lines) + "\n"


def write_report(res: dict, out: Path) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "regimes.md").write_text(markdown(res))
