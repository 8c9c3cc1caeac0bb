"""Smoke tests of benchmarks/: each starts at --tiny size and writes valid JSON.

Each benchmark runs as CI would run it, `python -m benchmarks --only NAME --tiny --out DIR`,
in a fresh process from the repository root, writing into a temporary directory. No
timing is asserted, ever: timings are for the benchmarks' own reports.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks import common  # noqa: E402
from benchmarks.__main__ import BY_NAME, REGISTRY  # noqa: E402

TOP_KEYS = {"benchmark", "size", "machine", "params", "cases", "notes", "seconds"}
MACHINE_KEYS = {"cpu_model", "cores", "ram_gib", "python", "torch", "ray", "date"}
CASE_KEYS = {"case", "ratio_of", "ratio", "target", "met", "details"}


def run_tiny(name: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", name, "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "RESULTS.md").is_file()
    res = json.loads((out / f"{name}.json").read_text())
    assert not list(out.glob("*.tmp"))
    return res


def check_result(res: dict, name: str) -> None:
    assert TOP_KEYS <= set(res)
    assert res["benchmark"] == name and res["size"] == "tiny"
    assert res["error"] is None
    assert MACHINE_KEYS <= set(res["machine"])
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu_model"]
    if res["skipped"]:
        return
    assert res["cases"]
    for c in res["cases"]:
        assert CASE_KEYS <= set(c), c
        r = c["ratio"]
        assert r["n"] >= 1 and all(math.isfinite(r[k]) for k in ("median", "min", "max"))
        assert r["min"] <= r["median"] <= r["max"]
        if c["target"] is None:
            assert c["met"] is None
        else:
            assert c["target"]["op"] in ("<=", ">=") and isinstance(c["met"], bool)


@pytest.mark.parametrize("name", [b.name for b in REGISTRY if not b.ray])
def test_tiny_benchmark_writes_valid_json(name, tmp_path):
    res = run_tiny(name, tmp_path)
    check_result(res, name)
    assert name in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.ray
def test_tiny_overhead_writes_valid_json(tmp_path):
    res = run_tiny("overhead", tmp_path)
    check_result(res, "overhead")
    assert {c["case"] for c in res["cases"]} >= {"job wall, excl. Ray start/stop"}


@pytest.mark.ray
@pytest.mark.parametrize("name", ["stacked", "scale", "load"])
def test_tiny_ray_benchmark_writes_valid_json(name, tmp_path):
    res = run_tiny(name, tmp_path)
    check_result(res, name)
    assert res["skipped"] is None


@pytest.mark.ray
def test_tiny_pbt_writes_valid_json(tmp_path):
    pytest.importorskip(
        "ray.tune", reason="the bench extra (ray[tune]) is not installed", exc_type=ImportError
    )
    res = run_tiny("pbt", tmp_path)
    check_result(res, "pbt")
    assert res["skipped"] is None
    assert [c["case"] for c in res["cases"]][:1] == ["end-to-end wall"]


def test_registry_names_benchmark_modules():
    for bench in REGISTRY:
        assert (ROOT / "benchmarks" / f"{bench.name}.py").is_file()
    assert set(BY_NAME) == {b.name for b in REGISTRY}
    assert {b.name for b in REGISTRY if b.ray} == {"overhead", "pbt", "stacked", "scale", "load"}
    assert not BY_NAME["pbt"].default  # needs the bench extra


def test_results_markdown_reports_misses_and_skips(tmp_path):
    cases = [
        common.case("a", "x / y", [2.0, 1.0, 3.0], ("<=", 1.05)),
        common.case("b", "x / y", [60.0], (">=", 50.0)),
        common.case("c", "x / y", [0.5]),
    ]
    common.write_json(tmp_path, common.result("one", "tiny", cases, ["a note"], {}, 1.0))
    skipped = common.result("two", "tiny", [], [], {}, 0.0)
    skipped["skipped"] = "ray.tune is not importable"
    common.write_json(tmp_path, skipped)
    assert [c["met"] for c in cases] == [False, True, None]
    assert cases[0]["ratio"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    md = common.write_markdown(tmp_path).read_text()
    assert "| one | a | x / y | 2 [1, 3] (n=3) | <= 1.05 | **no** |" in md
    assert "| one | b | x / y | 60 [60, 60] (n=1) | >= 50 | yes |" in md
    assert "| two | skipped | ray.tune is not importable |" in md
    assert "a note" in md
