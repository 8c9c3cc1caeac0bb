"""Run the benchmarks: `python -m benchmarks [--full] [--only NAME] [--tiny] [--out DIR]`.

No flags: the default subset at default size. --full: every benchmark at full size.
--only NAME: one benchmark (at full size with --full). --tiny: tiny sizes, for CI.

Each benchmark writes <out>/<name>.json, plus what its optional `write_report(res, out)`
adds (e.g. quality.md); the runner then writes <out>/RESULTS.md, one table over every JSON
in <out>. With more than one benchmark selected, each runs in its own fresh process, so one
benchmark's threads, memory or Ray instance cannot skew the next.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common


@dataclass(frozen=True)
class Bench:
    name: str  # module benchmarks.<name>, with run(size) -> (cases, notes, params)
    default: bool  # in the default subset (must finish in under 10 minutes in all)
    ray: bool  # starts local Ray instances (its smoke test is marked `ray`)
    what: str


REGISTRY = [
    Bench("compat", True, False, "coordinator Gram vs the seed's pair loop and the roofline"),
    Bench("tether_cost", True, False, "tethered MLP forward+backward vs a plain MLP"),
    Bench("history_query", True, False, "history queries with vs without indexes"),
    Bench("overhead", True, True, "the default job with coordination on vs off"),
    Bench("pbt", False, True, "Ray Tune PBT vs our job (needs the bench extra)"),
    Bench(
        "flower",
        False,
        True,
        "Flower's simulation (FedAvg, FedAvgM) vs our CLI job (builds its own Flower venv)",
    ),
    Bench(
        "stacked",
        False,
        True,
        "stacked workers (k=8, 64) vs single-model actors and vs the bare stacked loop",
    ),
    Bench("scale", False, True, "a 256-model job in stacked workers; round time vs M"),
    Bench("load", False, True, "32 concurrent publishers: publications/s and latency"),
    Bench(
        "quality",
        False,
        False,
        "ensemble accuracy/NLL/calibration/diversity of each merge variant vs independent",
    ),
    Bench("soup", False, False, "the greedy soup vs the best member and the ensemble"),
    Bench(
        "regimes",
        False,
        False,
        "policies where members differ: gravity vs FedAvg(M), the oracle, IFCA, FedAMP",
    ),
]
BY_NAME = {b.name: b for b in REGISTRY}


def run_one(name: str, size: str, out: Path) -> bool:
    """Run one benchmark in this process and write its JSON. True if it did not fail."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    module = None
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        cases, notes, params = module.run(size)
        res = common.result(name, size, cases, notes, params, time.perf_counter() - t0)
    except common.Skipped as skip:
        res = common.result(name, size, [], [], {}, time.perf_counter() - t0)
        res["skipped"] = str(skip)
    except Exception:
        res = common.result(name, size, [], [], {}, time.perf_counter() - t0)
        res["error"] = traceback.format_exc()
    report = getattr(module, "write_report", None)  # an optional extra file, e.g. quality.md
    if report is not None and not (res["error"] or res["skipped"]):
        try:
            report(res, out)
        except Exception:
            res["error"] = traceback.format_exc()
    path = common.write_json(out, res)
    status = "error" if res["error"] else "skipped" if res["skipped"] else "ok"
    print(f"{name}: {status} in {res['seconds']:.1f} s -> {path}", flush=True)
    if res["error"]:
        print(res["error"], file=sys.stderr)
    return res["error"] is None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--full", action="store_true", help="every benchmark, at full size")
    ap.add_argument("--only", choices=sorted(BY_NAME), help="just this benchmark")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CI smoke test)")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results directory")
    args = ap.parse_args(argv)

    common.local_ray()  # before anything imports ray
    size = "tiny" if args.tiny else "full" if args.full else "default"
    if args.only:
        names = [args.only]
    elif args.full or args.tiny:
        names = [b.name for b in REGISTRY]
    else:
        names = [b.name for b in REGISTRY if b.default]

    if len(names) == 1:
        ok = run_one(names[0], size, args.out)
    else:
        ok = True
        for name in names:
            cmd = [sys.executable, "-m", "benchmarks", "--only", name, "--out", str(args.out)]
            cmd += ["--tiny"] if args.tiny else ["--full"] if args.full else []
            ok &= subprocess.run(cmd, env=os.environ.copy()).returncode == 0
    print(f"-> {common.write_markdown(args.out)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
