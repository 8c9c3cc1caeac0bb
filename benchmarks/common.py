"""Shared by every benchmark: timing with repeats, machine info, targets, writing results.

Speed is only ever reported as a ratio of two things timed side by side in the same run,
summarised as the median over repeats with the min and max.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

SIZES = ("tiny", "default", "full")

# The plain mechanics: tether-space cosine compatibility, pairwise drift, tether-only merges,
# no alignment or guard. The speed benchmarks were measured with these (and the load and
# scale ones publish synthetic tethers with no probe-batch outputs), so they pin them
# whatever the defaults recommend. benchmarks/quality.py compares the options.
PLAIN = [
    "model.init=independent",
    "compat.fn=cosine",
    "compat.normalize=zscore",
    "policy.name=threshold",
    "policy.merge_above=1.0",
    "policy.drift_below=-1.0",
    "policy.align=false",
    "policy.guard=false",
    "policy.share=tethers",
    "policy.drift=pairwise",
]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def layered(*lists: list[str]) -> list[str]:
    """--set overrides, list after list; a list that names another policy (policy.name=...)
    drops the earlier lists' policy settings: a policy takes only its own keys."""
    out: list[str] = []
    for overrides in lists:
        if any(o.startswith("policy.name=") for o in overrides):
            out = [o for o in out if not o.startswith("policy.")]
        out += list(overrides)
    return out


class Skipped(Exception):
    """Raised by a benchmark that cannot run here (e.g. an optional extra is missing)."""


def local_ray() -> None:
    """Environment for the private, loopback-only Ray instances the benchmarks start.

    Must run before anything imports ray. Token auth is off for these local instances only.
    """
    from ensemble.runtime.cluster import local_ray_env

    local_ray_env()
    os.environ["RAY_AUTH_MODE"] = "disabled"


# ---------------------------------------------------------------- timing


def spread(xs: list[float]) -> dict:
    """Median, min, max and count of repeated measurements."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def time_call(fn: Callable[[], object], inner: int = 1) -> float:
    """Seconds per call of fn, averaged over `inner` back-to-back calls."""
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def calibrate(fn: Callable[[], object], min_seconds: float) -> int:
    """How many back-to-back calls of fn take at least min_seconds (at least 1)."""
    n, t = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - t >= min_seconds:
            return n


def side_by_side(
    fns: dict[str, Callable[[], object]], repeats: int, min_seconds: float = 0.02
) -> dict[str, list[float]]:
    """Time each fn once per repeat, interleaved, alternating the order every repeat.

    Each timing averages enough back-to-back calls to last min_seconds (the calibration
    run doubles as warm-up). Returns seconds per call, one entry per repeat, so repeat r
    of one fn pairs with repeat r of another: drift in machine load hits both sides.
    """
    names = list(fns)
    inner = {n: calibrate(fns[n], min_seconds) for n in names}
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(time_call(fns[n], inner[n]))
    return out


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-repeat ratios of paired measurements."""
    return [a / b for a, b in zip(num, den, strict=True)]


# ---------------------------------------------------------------- targets and cases


def case(
    name: str,
    what: str,
    values: list[float],
    target: tuple[str, float] | None = None,
    **details,
) -> dict:
    """One row of results: a ratio over repeats, its target ('<=', '<' or '>=', value) and met?.

    `met` judges the median; it is None when the case has no target.
    """
    r = spread(values)
    met = None
    if target is not None:
        op, bound = target
        met = {
            "<=": r["median"] <= bound,
            "<": r["median"] < bound,
            ">=": r["median"] >= bound,
        }[op]
    return {
        "case": name,
        "ratio_of": what,
        "ratio": r,
        "target": None if target is None else {"op": target[0], "value": target[1]},
        "met": met,
        "details": details,
    }


# ---------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(pkg: str) -> str | None:
    try:  # metadata, not import: importing ray here would bind it before local_ray()
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": None if load is None else [round(x, 2) for x in load],
    }


# ---------------------------------------------------------------- results


def result(
    name: str, size: str, cases: list[dict], notes: list[str], params: dict, seconds: float
) -> dict:
    return {
        "benchmark": name,
        "size": size,
        "machine": machine(),
        "params": params,
        "cases": cases,
        "notes": notes,
        "seconds": round(seconds, 2),
        "skipped": None,
        "error": None,
    }


def write_json(out_dir: Path, res: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{res['benchmark']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(x):
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def _row(bench: str, c: dict) -> str:
    r = c["ratio"]
    measured = f"{_fmt(r['median'])} [{_fmt(r['min'])}, {_fmt(r['max'])}] (n={r['n']})"
    t = c["target"]
    target = "-" if t is None else f"{t['op']} {_fmt(t['value'])}"
    met = {True: "yes", False: "**no**", None: "-"}[c["met"]]
    return f"| {bench} | {c['case']} | {c['ratio_of']} | {measured} | {target} | {met} |"


def write_markdown(out_dir: Path) -> Path:
    """RESULTS.md: one table over every <name>.json in out_dir."""
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks` from the JSON files beside this one. Every number",
        "is a ratio of two things timed side by side in the same run: median [min, max] over",
        "n repeats. `met?` judges the median. The machine is shared, so the spread is real noise.",
        "",
        "| benchmark | case | ratio of | measured median [min, max] | target | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        if res.get("error") or res.get("skipped"):
            why = "error" if res.get("error") else "skipped"
            msg = (res.get("error") or res.get("skipped")).strip().splitlines()[-1]
            lines.append(f"| {res['benchmark']} | {why} | {msg} | - | - | - |")
        for c in res.get("cases", []):
            lines.append(_row(res["benchmark"], c))
    lines += ["", "## Runs", ""]
    for res in results:
        m = res["machine"]
        lines.append(
            f"- **{res['benchmark']}** ({res['size']}, {res['seconds']} s, {m['date']}): "
            f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB, Python {m['python']}, "
            f"torch {m['torch']}, Ray {m['ray']}, load {m['load_average_at_start']}"
        )
        for note in res.get("notes", []):
            lines.append(f"  - {note}")
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path
