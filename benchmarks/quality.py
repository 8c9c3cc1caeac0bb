"""Ensemble quality (issue 8, "Make merging pay"): do merges and drifts of tethers give a
better ensemble than the same members trained independently?

Each (dataset, variant, seed) is one whole job run in one process without Ray: every
member in one stack, driven by `ensemble.runtime.job.drive` (the synchronous protocol, which a Ray
job in `coordinator.mode: sync` reproduces exactly). The job is `configs/all-data.yaml` with
BASE overrides, the size's overrides, then the variant's (VARIANTS, below), then seed,
dataset and job name. After training, every member that did not fail is scored on the
validation and test splits: ensemble (mean of member probabilities) accuracy, NLL and ECE,
mean pairwise disagreement and KL, and the members' own mean accuracy and NLL.

Rows are mean ± sd over seeds. The recommended variant is the tethered row (not a BASELINE)
with the lowest mean VALIDATION ensemble NLL; test numbers never choose it. A variant that
raises (e.g. a config key not implemented yet) becomes an error row with its message.

Runs are independent: a spawn Pool of QUALITY_PROCS processes (default 2), one torch
thread each. Environment variables select a subset (comma- or semicolon-separated, names
as in VARIANTS):
QUALITY_VARIANTS, QUALITY_DATASETS; QUALITY_SEEDS overrides the number of seeds.

Cases (RESULTS.md): per dataset and variant, the ensemble test NLL over independent's, paired
by seed (< 1 is better); the recommended variant carries targets: NLL ratio <= 1 and test
accuracy ratio >= 1. The full table is `quality.md` beside the JSON (`write_report`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import PLAIN, case, layered

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "all-data.yaml"
BASE = [
    "models.count=8",
    "train.epochs=20",
    "model.layers=[64, 64, 64]",
    # Every option spelled out at its plain value, so the rows below stay what they say
    # whatever configs/all-data.yaml recommends.
    *PLAIN,
]

# name -> extra --set overrides on top of BASE (edit freely; the order is the table's)
VARIANTS: dict[str, list[str]] = {
    "single model": ["models.count=1", "policy.name=none"],
    "independent": ["policy.name=none"],
    "seed rule": [
        "policy.name=seed",
        "compat.fn=dot",
        "compat.normalize=none",
        "policy.merge_above=50",
        "tether.init=uniform",
    ],
    # control: the seed rule's uniform U[0,1) tethers with no coordination at all
    "independent, uniform tethers": ["policy.name=none", "tether.init=uniform"],
    "threshold (old default)": ["policy.name=threshold"],
    "shared init": ["model.init=shared"],
    "function-space (cka)": ["compat.fn=cka"],
    "aligned": ["policy.align=true"],
    "merge guard": ["policy.guard=true"],
    "repulsive drift": ["policy.drift=repulsive"],
    "weight merge": ["policy.share=both"],
    "aligned weight merge": ["policy.align=true", "policy.share=both"],
    "aligned + guard": ["policy.align=true", "policy.guard=true"],
    "aligned weight merge + guard": [
        "policy.align=true",
        "policy.share=both",
        "policy.guard=true",
    ],
    "combined": [
        "compat.fn=cka",
        "policy.align=true",
        "policy.share=both",
        "policy.guard=true",
    ],
    "combined + repulsive": [
        "compat.fn=cka",
        "policy.align=true",
        "policy.share=both",
        "policy.guard=true",
        "policy.drift=repulsive",
    ],
}
BASELINES = (
    "single model",
    "independent",
    "independent, uniform tethers",
)  # untethered: never the recommendation
REFERENCE = "independent"  # what the tethered rows must beat

SIZES = {
    "tiny": {
        # 3 models, not 2: z-scored compat over a single pair is 0, so 2 never merge
        "set": ["models.count=3", "train.epochs=1", "model.layers=[8]"],
        "seeds": 1,
        "datasets": ["digits"],
        "variants": ["single model", "independent", "threshold (old default)", "combined"],
    },
    "default": {"set": [], "seeds": 5, "datasets": ["digits", "breast_cancer"], "variants": None},
    "full": {"set": [], "seeds": 10, "datasets": ["digits", "breast_cancer"], "variants": None},
}

# per-run metrics, in table order: key -> column title
METRICS = {
    "test_acc": "test acc",
    "test_nll": "test NLL",
    "test_ece": "test ECE",
    "disagreement": "disagreement",
    "pairwise_kl": "pairwise KL",
    "val_acc": "val acc",
    "val_nll": "val NLL",
    "member_test_acc": "member acc",
    "member_test_nll": "member NLL",
}
COUNTS = {"merges": "merges", "drifts": "drifts", "rejected": "rejected"}


# ---------------------------------------------------------------- one run


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def job_name(dataset: str, variant: str, seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{dataset}-{variant}").strip("-")
    return f"q-{slug}-s{seed}"[-64:].lstrip("-_.")


def dataset_overrides(spec: str) -> list[str]:
    """'digits' or 'digits@dirichlet:0.3' / 'digits@shard' / 'digits@iid' -> --set keys."""
    name, _, part = spec.partition("@")
    out = [f"data.name={name}"]
    if part:
        kind, _, alpha = part.partition(":")
        out.append(f"data.partition={kind}")
        if alpha:
            out.append(f"data.alpha={alpha}")
    return out


GLOBAL = "score=global"  # a variant's pseudo-override: score the members' plain average


def train_and_score(overrides: list[str], dataset: str, seed: int, job: str) -> dict:
    """One job in this process (no Ray); the scores of its ensemble and members. With
    GLOBAL among the overrides, the scores are those of one model, the members' plain
    average at the end (FedAvg's global model), not of their ensemble."""
    from ensemble.config import load_config
    from ensemble.outputs.evaluation import disagreement, ece, ensemble_probs, pairwise_kl
    from ensemble.outputs.evaluation import score as scores
    from ensemble.outputs.export import average, folded, module_of, probs_of
    from ensemble.runtime.job import drive, make_trainer, open_coordinator, prepare

    as_global = GLOBAL in overrides
    overrides = [o for o in overrides if o != GLOBAL]
    cfg = load_config(
        BASE_CONFIG, [*overrides, f"seed={seed}", *dataset_overrides(dataset), f"job={job}"]
    )
    prep = prepare(cfg)
    data = prep.data
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        coord = open_coordinator(prep, Path(tmp))
        try:  # one stack of every member, with a checkpoint for rollbacks on a poisoned loss
            ckpt = Path(tmp) / "checkpoints"
            t = make_trainer(prep, list(range(cfg.models.count)), checkpoint_dir=ckpt)
            drive([t], coord)
        finally:
            coord.history.close()
    live = ~t.failed
    if not live.any():
        raise RuntimeError(f"all {t.k} members failed (non-finite loss)")
    val, test = list(t.predict_proba(data.x_val)[live]), list(t.predict_proba(data.x_test)[live])
    if as_global:  # one model: the members' average (no alignment: they share an init)
        mean = average([folded(t.stack.member_state(i)) for i in map(int, live.nonzero()[0])])
        one = module_of(cfg, data, mean)
        val, test = [probs_of(one, data.x_val)], [probs_of(one, data.x_test)]
    ens_val, ens_test = scores(ensemble_probs(val), data.y_val), ensemble_probs(test)
    ens = scores(ens_test, data.y_test)
    own = [scores(p, data.y_test) for p in test]
    return {
        "test_acc": ens["accuracy"],
        "test_nll": ens["nll"],
        "test_ece": ece(ens_test, data.y_test),
        "disagreement": disagreement(test),
        "pairwise_kl": pairwise_kl(test),
        "val_acc": ens_val["accuracy"],
        "val_nll": ens_val["nll"],
        "member_test_acc": float(np.mean([s["accuracy"] for s in own])),
        "member_test_nll": float(np.mean([s["nll"] for s in own])),
        "merges": coord.merges,
        "drifts": coord.drifts,
        "rejected": getattr(coord, "rejected", 0),
        "members": int(live.sum()),
        "failed_members": int((~live).sum()),
    }


def one_run(task: tuple[str, str, int, list[str]]) -> dict:
    """A run as a record; an exception becomes {'error': message, 'traceback': ...}."""
    dataset, variant, seed, overrides = task
    out: dict = {"dataset": dataset, "variant": variant, "seed": seed}
    t = time.perf_counter()
    try:
        out.update(train_and_score(overrides, dataset, seed, job_name(dataset, variant, seed)))
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        out["error"] = f"{type(e).__name__}: {lines[0]}"
        out["traceback"] = traceback.format_exc()[-3000:]
    out["seconds"] = round(time.perf_counter() - t, 2)
    return out


# ---------------------------------------------------------------- selection and the pool


def _subset(env: str, chosen: list[str], known: list[str] | None) -> list[str]:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return chosen
    sep = ";" if ";" in raw else ","  # ";" for names that hold commas
    names = [n.strip() for n in raw.split(sep) if n.strip()]
    if known is None:  # datasets: any name or name@partition; loading one names a bad one
        return names
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{env}: unknown {unknown}; choose from {known}")
    return names


@dataclass(frozen=True)
class Study:
    """A table of whole jobs: variants (rows) × datasets (tables) × seeds."""

    name: str  # the benchmark: results/<name>.json and <name>.md
    title: str
    variants: dict[str, list[str]]  # row -> --set overrides on top of `base`
    baselines: tuple[str, ...]  # rows that are never the recommendation
    reference: str  # what the other rows are paired with
    base: list[str]
    sizes: dict
    # name -> which datasets form a regime; the recommendation is made per regime
    regimes: dict[str, Callable[[str], bool]] = field(default_factory=lambda: {"all": bool})
    reference_can_win: bool = False  # the reference is a candidate too (do no harm)
    # datasets that never choose: the regime's recommendation is only reported on them
    held_out: Callable[[str], bool] = lambda d: False
    # a row the recommendation must beat where it ran too (NLL below it, accuracy no worse)
    bar: str | None = None
    bar_where: Callable[[str], bool] = lambda d: True  # on which datasets
    # dataset -> the bound on the recommendation's test NLL over the reference's
    nll_bounds: dict[str, float] = field(default_factory=dict)
    # rows (by their overrides) whose training reads the validation split: never chosen
    fitted: Callable[[list[str]], bool] = lambda overrides: False


def plan(size: str, study: Study) -> dict:
    """Datasets, variants, seeds and per-variant overrides for this size and environment."""
    s = study.sizes[size]
    known = list(study.variants)
    variants = _subset("QUALITY_VARIANTS", s["variants"] or known, known)
    datasets = _subset("QUALITY_DATASETS", s["datasets"], None)
    seeds = int(os.environ.get("QUALITY_SEEDS") or s["seeds"])
    if seeds < 1:
        raise ValueError(f"QUALITY_SEEDS: need at least 1 seed, got {seeds}")
    return {
        "datasets": datasets,
        "variants": variants,
        "seeds": list(range(seeds)),
        "overrides": {v: layered(study.base, s["set"], study.variants[v]) for v in variants},
        "processes": max(1, int(os.environ.get("QUALITY_PROCS") or 2)),
    }


def run_all(p: dict) -> list[dict]:
    """Every (dataset, variant, seed), over a spawn Pool, with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    tasks = [
        (d, v, seed, p["overrides"][v])
        for seed in p["seeds"]
        for d in p["datasets"]
        for v in p["variants"]
    ]
    procs = min(p["processes"], len(tasks))
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    out = []
    with Progress(*columns, console=Console(stderr=True)) as bar:
        job = bar.add_task(f"quality: {len(tasks)} runs on {procs} processes", total=len(tasks))
        if procs == 1:
            _init_worker()
            results = map(one_run, tasks)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(procs, initializer=_init_worker)
            results = pool.imap_unordered(one_run, tasks)
        try:
            for r in results:
                out.append(r)
                what = "error" if "error" in r else f"test NLL {r['test_nll']:.4f}"
                bar.console.log(f"{r['dataset']} / {r['variant']} / seed {r['seed']}: {what}")
                bar.advance(job)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return out


# ---------------------------------------------------------------- summary


def _stat(xs: list[float]) -> dict:
    return {
        "mean": float(np.mean(xs)),
        "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None,
        "values": [float(x) for x in xs],
    }


def summarise(runs: list[dict], p: dict) -> dict:
    """dataset -> variant -> {n, errors, <metric>: {mean, sd, values}, seconds}."""
    rows: dict[str, dict[str, dict]] = {}
    for d in p["datasets"]:
        rows[d] = {}
        for v in p["variants"]:
            mine = sorted(
                (r for r in runs if r["dataset"] == d and r["variant"] == v),
                key=lambda r: r["seed"],
            )
            ok = [r for r in mine if "error" not in r]
            row: dict = {
                "n": len(ok),
                "seeds": [r["seed"] for r in ok],
                "errors": sorted({r["error"] for r in mine if "error" in r}),
                "seconds": _stat([r["seconds"] for r in mine]),
            }
            if ok:
                for k in [*METRICS, *COUNTS, "failed_members"]:
                    row[k] = _stat([r[k] for r in ok])
            rows[d][v] = row
    return rows


def choose(rows: dict[str, dict[str, dict]], study: Study) -> str | None:
    """One recommendation for these datasets: the row (not a baseline, ran on all of them)
    with the lowest geometric mean, over datasets, of its mean validation NLL relative to
    the reference's (its plain mean validation NLL where the reference did not run). Test
    numbers never choose. Rows whose training reads the validation split (study.fitted: the
    merge guard keeps only merges that lower it) are not candidates: their validation NLL
    is fitted, not measured. Where the reference can win (do no harm), another row must
    beat it clearly: the mean over datasets and seeds of log(val NLL / the reference's),
    plus twice its standard error, below 0."""
    scores: dict[str, float] = {}
    for v in study.variants:
        candidate = v not in study.baselines or (study.reference_can_win and v == study.reference)
        if study.fitted(study.variants[v]):
            candidate = False
        if not candidate or not all(v in r and r[v]["n"] for r in rows.values()):
            continue
        logs = []
        for r in rows.values():
            ref = r.get(study.reference)
            scale = ref["val_nll"]["mean"] if ref and ref["n"] else 1.0
            logs.append(math.log(max(r[v]["val_nll"]["mean"], 1e-12) / scale))
        scores[v] = sum(logs) / len(logs)
    if study.reference_can_win and study.reference in scores:
        for v in list(scores):
            pairs = [
                math.log(max(a, 1e-12) / max(b, 1e-12))
                for r in rows.values()
                if study.reference in r
                for a, b in _by_seed(r[v], r[study.reference], "val_nll")
            ]
            if v != study.reference and len(pairs) > 1:
                se = float(np.std(pairs, ddof=1)) / math.sqrt(len(pairs))
                if float(np.mean(pairs)) + 2 * se >= 0:
                    del scores[v]  # not clearly better than doing nothing
    return min(scores, key=scores.get) if scores else None


def recommend(rows: dict[str, dict], best: str | None, study: Study) -> dict | None:
    """How the chosen row does on one dataset: does it beat the reference on test?"""
    if best is None or best not in rows or not rows[best]["n"]:
        return None
    b, ref = rows[best], rows.get(study.reference)
    out = {
        "variant": best,
        "val_nll": b["val_nll"]["mean"],
        "test_nll": b["test_nll"]["mean"],
        "test_acc": b["test_acc"]["mean"],
        "reference": None,
        "beats_reference": None,
    }
    if ref and ref["n"]:
        nll_better = b["test_nll"]["mean"] < ref["test_nll"]["mean"]
        acc_ok = b["test_acc"]["mean"] >= ref["test_acc"]["mean"]
        out["reference"] = {
            "variant": study.reference,
            "test_nll": ref["test_nll"]["mean"],
            "test_acc": ref["test_acc"]["mean"],
        }
        out["beats_reference"] = bool(nll_better and acc_ok)
    return out


def _by_seed(a: dict, b: dict, key: str) -> list[tuple[float, float]]:
    """(a's key, b's key) for each seed both rows have, in seed order."""
    va = dict(zip(a["seeds"], a[key]["values"], strict=True))
    vb = dict(zip(b["seeds"], b[key]["values"], strict=True))
    return [(va[s], vb[s]) for s in sorted(set(va) & set(vb))]


def _paired(a: dict, b: dict, key: str) -> list[float]:
    """a's key over b's, per seed both rows have."""
    return [x / y for x, y in _by_seed(a, b, key) if y != 0]


def make_cases(rows: dict[str, dict], best: dict[str, dict | None], study: Study) -> list[dict]:
    cases = []
    reference = study.reference
    for d, by_variant in rows.items():
        ref = by_variant.get(reference)
        rec = (best.get(d) or {}).get("variant")
        for v, row in by_variant.items():
            if not row["n"]:
                continue
            if ref is None or not ref["n"]:  # nothing to pair with: absolute numbers
                cases.append(
                    case(f"{d}: {v}", "ensemble test NLL (absolute)", row["test_nll"]["values"])
                )
                continue
            if v == reference:
                continue
            nll = _paired(row, ref, "test_nll")
            if not nll:
                continue
            target = ("<=", study.nll_bounds.get(d, 1.0)) if v == rec else None
            details = {k: row[k]["mean"] for k in METRICS}
            cases.append(
                case(
                    f"{d}: {v}",
                    f"ensemble test NLL / {reference}'s (paired by seed)",
                    nll,
                    target,
                    recommended=v == rec,
                    **details,
                )
            )
            if v == rec:
                acc = _paired(row, ref, "test_acc")
                cases.append(
                    case(
                        f"{d}: {v} (recommended)",
                        f"ensemble test accuracy / {reference}'s (paired by seed)",
                        acc,
                        (">=", 1.0),
                    )
                )
                bar = by_variant.get(study.bar or "")
                if bar is not None and bar["n"] and v != study.bar and study.bar_where(d):
                    for key, what, target in (
                        ("test_nll", "test NLL", ("<", 1.0)),
                        ("test_acc", "test accuracy", (">=", 1.0)),
                    ):
                        cases.append(
                            case(
                                f"{d}: {v} (recommended) vs {study.bar}",
                                f"ensemble {what} / {study.bar}'s (paired by seed)",
                                _paired(row, bar, key),
                                target,
                            )
                        )
    return cases


def run(size: str) -> tuple[list[dict], list[str], dict]:
    return run_study(size, QUALITY)


def run_study(size: str, study: Study) -> tuple[list[dict], list[str], dict]:
    from ensemble.config import load_config

    p = plan(size, study)
    load_config(BASE_CONFIG, [*study.base, *study.sizes[size]["set"]])  # a typo fails here
    t = time.perf_counter()
    runs = run_all(p)
    wall = time.perf_counter() - t
    rows = summarise(runs, p)
    best: dict[str, dict | None] = {}
    chosen: dict[str, str | None] = {}
    for regime, member in study.regimes.items():
        mine = {d: r for d, r in rows.items() if member(d)}
        tuning = {d: r for d, r in mine.items() if not study.held_out(d)}
        if tuning:
            chosen[regime] = choose(tuning, study)
            best.update({d: recommend(r, chosen[regime], study) for d, r in mine.items()})
    cases = make_cases(rows, best, study)
    ref = study.reference
    notes = [
        f"Each run: one job in one process without Ray (one stack, the synchronous protocol, "
        f"called directly); {BASE_CONFIG.relative_to(ROOT)} with "
        f"{[*study.base, *study.sizes[size]['set']]}, then the variant's overrides. seeds: "
        f"{len(p['seeds'])}, runs: {len(runs)} on {min(p['processes'], len(runs))} processes "
        f"in {wall:.0f} s.",
        f"Recommended = one row per regime ({', '.join(study.regimes)}), not a baseline: the "
        "lowest geometric mean over the regime's datasets of its mean VALIDATION ensemble NLL "
        f"relative to {ref}'s. It beats {ref} when its mean test NLL is lower and its mean "
        f"test accuracy no worse. Δ columns: test NLL minus {ref}'s, paired by seed (same "
        "split, same member seeds), mean ± sd, and on how many seeds it was lower.",
    ]
    for d, b in best.items():
        if b is None:
            notes.append(f"{d}: no candidate row ran.")
        elif b["reference"] is None:
            notes.append(
                f"{d}: recommended {b['variant']!r} (val NLL {b['val_nll']:.4f}); "
                f"no {ref} row to compare with."
            )
        else:
            r = b["reference"]
            notes.append(
                f"{d}: recommended {b['variant']!r} (val NLL {b['val_nll']:.4f}): test NLL "
                f"{b['test_nll']:.4f} vs {ref} {r['test_nll']:.4f}, accuracy "
                f"{b['test_acc']:.4f} vs {r['test_acc']:.4f}: "
                + (f"beats {ref}." if b["beats_reference"] else f"does NOT beat {ref}.")
            )
    for d, by_variant in rows.items():
        for v, row in by_variant.items():
            for e in row["errors"]:
                notes.append(f"{d}: {v}: error: {e}")
    params = {
        "study": study.name,
        "title": study.title,
        "reference": ref,
        "base_config": str(BASE_CONFIG.relative_to(ROOT)),
        "base_overrides": [*study.base, *study.sizes[size]["set"]],
        "datasets": p["datasets"],
        "seeds": p["seeds"],
        "processes": p["processes"],
        "variants": {v: study.variants[v] for v in p["variants"]},
        "baselines": list(study.baselines),
        "regimes": {k: [d for d in rows if m(d)] for k, m in study.regimes.items()},
        "chosen": chosen,
        "rows": rows,
        "recommended": best,
        "runs": runs,
        "wall_seconds": round(wall, 2),
    }
    return cases, notes, params


# ---------------------------------------------------------------- quality.md


def _cell(stat: dict | None, digits: int = 4) -> str:
    if stat is None:
        return "-"
    m, sd = stat["mean"], stat["sd"]
    if not math.isfinite(m):
        return str(m)
    return f"{m:.{digits}f}" if sd is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


def paired_delta(row: dict, ref: dict | None, key: str = "test_nll") -> tuple[str, str]:
    """(mean ± sd of row - ref per seed, 'k/n' seeds where row is lower) as table cells."""
    if ref is None or not ref["n"] or row is ref:
        return "-", "-"
    d = [x - y for x, y in _by_seed(row, ref, key)]
    if not d:
        return "-", "-"
    sd = f" ± {np.std(d, ddof=1):.4f}" if len(d) > 1 else ""
    return f"{np.mean(d):+.4f}{sd}", f"{sum(x < 0 for x in d)}/{len(d)}"


def markdown(res: dict) -> str:
    params = res["params"]
    cols = [*METRICS.values(), "Δ test NLL", "seeds lower", *COUNTS.values()]
    lines = [
        f"# {params.get('title', 'Ensemble quality')}",
        "",
        f"Generated by `python -m benchmarks --only {res['benchmark']}` ({res['size']}, "
        f"{res['seconds']} s, {res['machine']['date']}). Mean ± sd over seeds; ensemble = "
        "mean of member probabilities; member acc/NLL = mean over members of their own "
        "scores; merges/drifts/rejected = mean per run. The recommended row is chosen on "
        "the validation NLL, never on test.",
        "",
        f"Base: `{params['base_config']}` with `{' '.join(params['base_overrides'])}`.",
    ]
    for d, by_variant in params["rows"].items():
        rec = (params["recommended"].get(d) or {}).get("variant")
        lines += ["", f"## {d}", ""]
        lines.append("| variant | n | " + " | ".join(cols) + " |")
        lines.append("| --- " * (len(cols) + 2) + "|")
        for v, row in by_variant.items():
            name = f"**{v}** (recommended)" if v == rec else v
            if not row["n"]:
                msg = "; ".join(row["errors"]).replace("|", "\\|")
                lines.append(f"| {name} | 0 | error: {msg} |" + " - |" * (len(cols) - 1))
                continue
            if row["errors"]:  # some seeds failed: the messages are in the notes
                name += " (some seeds failed)"
            cells = [_cell(row[k]) for k in METRICS]
            cells += paired_delta(row, by_variant.get(params.get("reference", REFERENCE)))
            cells += [_cell(row[k], 1) for k in COUNTS]
            lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    lines += ["", "## Variants", ""]
    for v, ov in params["variants"].items():
        lines.append(f"- **{v}**: `{' '.join(ov) or '(base only)'}`")
    return "\n".join(lines) + "\n"


def write_report(res: dict, out_dir: Path) -> Path:
    """<name>.md beside <name>.json: one table per dataset, rows = variants."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"{res['benchmark']}.md"
    path.write_text(markdown(res))
    return path


QUALITY = Study("quality", "Ensemble quality", VARIANTS, BASELINES, REFERENCE, BASE, SIZES)
