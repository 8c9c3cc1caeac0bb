"""Smoke tests of benchmarks/: each starts at --tiny size and writes valid JSON.

Each benchmark runs as CI would run it, `python -m benchmarks --only NAME --tiny --out DIR`,
in a fresh process from the repository root, writing into a temporary directory. No
timing is asserted, ever: timings are for the benchmarks' own reports.
"""

import json
import math
import os
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
            assert c["target"]["op"] in ("<=", "<", ">=") and isinstance(c["met"], bool)


@pytest.mark.parametrize("name", [b.name for b in REGISTRY if not b.ray])
def test_tiny_benchmark_writes_valid_json(name, tmp_path):
    res = run_tiny(name, tmp_path)
    check_result(res, name)
    assert name in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.ray
def test_tiny_overhead_writes_valid_json(tmp_path):
    res = run_tiny("overhead", tmp_path)
    check_result(res, "overhead")
    cases = {c["case"] for c in res["cases"]}
    assert "default job wall, excl. Ray start/stop: sync / async" in cases


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


@pytest.mark.ray
def test_tiny_flower_writes_valid_json_or_skips(tmp_path):
    """Offline: --tiny never builds the Flower venv; without it the benchmark is skipped."""
    res = run_tiny("flower", tmp_path)
    check_result(res, "flower")
    if res["skipped"] is None:
        assert [c["case"] for c in res["cases"]][:2] == [
            "FedAvgM 0.3: process wall",
            "FedAvgM 0.3: global test NLL",
        ]
        assert (tmp_path / "flower.md").is_file()
    else:
        assert "Flower venv" in res["skipped"]


def test_registry_names_benchmark_modules():
    for bench in REGISTRY:
        assert (ROOT / "benchmarks" / f"{bench.name}.py").is_file()
    assert set(BY_NAME) == {b.name for b in REGISTRY}
    assert {b.name for b in REGISTRY if b.ray} == {
        "overhead",
        "pbt",
        "flower",
        "stacked",
        "scale",
        "load",
    }
    assert not BY_NAME["pbt"].default  # needs the bench extra
    assert not BY_NAME["flower"].default  # builds its own venv
    assert not BY_NAME["quality"].default  # minutes of training per dataset at default size


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


# ---------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def quality_tiny(tmp_path_factory):
    """One tiny quality run for the tests below (no QUALITY_* subset from the caller)."""
    out = tmp_path_factory.mktemp("quality")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUALITY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "quality", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "quality.json").read_text()), out


def test_tiny_quality_rows_metrics_and_counts(quality_tiny):
    from benchmarks import quality

    res, out = quality_tiny
    check_result(res, "quality")
    params = res["params"]
    tiny = quality.SIZES["tiny"]
    assert params["datasets"] == ["digits"] and params["seeds"] == [0]
    rows = params["rows"]["digits"]
    assert list(rows) == tiny["variants"]  # the table's order is VARIANTS'
    assert len(params["runs"]) == len(tiny["variants"])  # one run per (variant, seed)
    for variant, row in rows.items():
        errored = sum(r["variant"] == variant and "error" in r for r in params["runs"])
        assert row["n"] + errored == 1, (variant, row)
        assert row["n"] == 1 or row["errors"], (variant, row)
    # every row runs; the untethered baselines never merge, drift or reject
    for variant, row in rows.items():
        assert row["n"] == 1 and not row["errors"], (variant, row)
        if variant in quality.BASELINES:
            assert row["merges"]["mean"] == 0 and row["drifts"]["mean"] == 0
            assert row["rejected"]["mean"] == 0
    classes = 10
    for variant, row in rows.items():
        if not row["n"]:
            continue
        m = {k: row[k]["mean"] for k in quality.METRICS}
        assert all(math.isfinite(v) for v in m.values()), (variant, m)
        for k in ("test_acc", "val_acc", "member_test_acc", "test_ece", "disagreement"):
            assert 0 <= m[k] <= 1, (variant, k, m[k])
        for k in ("test_nll", "val_nll", "member_test_nll", "pairwise_kl"):
            assert m[k] >= 0, (variant, k, m[k])
        assert row["test_nll"]["sd"] is None  # one seed: no spread to report
    # even one epoch learns something: better than chance and than a uniform guess
    ind = rows["independent"]
    assert ind["test_acc"]["mean"] > 1.5 / classes
    assert ind["val_nll"]["mean"] < math.log(classes)
    assert ind["disagreement"]["mean"] > 0 and ind["pairwise_kl"]["mean"] > 0
    single = rows["single model"]
    assert single["disagreement"]["mean"] == 0 and single["pairwise_kl"]["mean"] == 0
    # the recommendation is chosen on validation among the tethered rows that ran
    rec = params["recommended"]["digits"]
    ran = [v for v, r in rows.items() if r["n"] and v not in quality.BASELINES]
    assert rec["variant"] in ran
    assert rec["val_nll"] == min(rows[v]["val_nll"]["mean"] for v in ran)
    assert isinstance(rec["beats_reference"], bool)
    # cases: every row but independent, as a ratio to it; the recommended one has targets
    names = [c["case"] for c in res["cases"]]
    assert [n for n in names if not n.endswith("(recommended)")] == [
        f"digits: {v}" for v, r in rows.items() if r["n"] and v != "independent"
    ]
    targeted = [c for c in res["cases"] if c["target"] is not None]
    assert {c["case"] for c in targeted} == {
        f"digits: {rec['variant']}",
        f"digits: {rec['variant']} (recommended)",
    }
    assert any(rec["variant"] in n and "beat" in n for n in res["notes"])
    # quality.md beside the JSON, and the rows in RESULTS.md
    md = (out / "quality.md").read_text()
    assert "## digits" in md and "| variant | n | test acc | test NLL |" in md
    for variant in tiny["variants"]:
        assert f"| {variant}" in md or f"| **{variant}** (recommended)" in md
    assert f"**{rec['variant']}** (recommended)" in md
    assert "| quality | digits: " in (out / "RESULTS.md").read_text()


def test_quality_variant_that_raises_is_an_error_row(monkeypatch):
    from benchmarks import quality

    bad = quality.one_run(("digits", "broken", 0, ["compat.fn=no-such-compat"]))
    assert bad["error"].startswith("ConfigError: ") and "no-such-compat" in bad["error"]
    assert "Traceback" in bad["traceback"] and bad["seconds"] >= 0
    p = {"datasets": ["digits"], "variants": ["independent", "broken"]}
    good = {k: 0.5 for k in [*quality.METRICS, *quality.COUNTS, "failed_members"]}
    ok = [
        {"dataset": "digits", "variant": "independent", "seed": s, "seconds": 1.0, **good}
        for s in (0, 1)
    ]
    rows = quality.summarise([*ok, {**bad, "variant": "broken"}], p)["digits"]
    assert rows["broken"]["n"] == 0 and rows["broken"]["errors"] == [bad["error"]]
    assert rows["independent"]["n"] == 2 and rows["independent"]["test_nll"]["sd"] == 0.0
    assert quality.choose({"digits": rows}, quality.QUALITY) is None  # no tethered row ran
    assert quality.recommend(rows, None, quality.QUALITY) is None
    res = {
        "benchmark": "quality",
        "size": "tiny",
        "seconds": 1.0,
        "machine": {"date": "now"},
        "notes": ["a note"],
        "params": {
            "base_config": "configs/default.yaml",
            "base_overrides": quality.BASE,
            "rows": {"digits": rows},
            "recommended": {"digits": None},
            "variants": {"independent": [], "broken": ["compat.fn=no-such-compat"]},
        },
    }
    md = quality.markdown(res)
    assert "| broken | 0 | error: ConfigError: " in md
    assert "| independent | 2 | 0.5000 ± 0.0000 |" in md


def test_quality_subset_from_the_environment(monkeypatch):
    from benchmarks import quality

    monkeypatch.setenv("QUALITY_VARIANTS", "independent, seed rule")
    monkeypatch.setenv("QUALITY_DATASETS", "wine")
    monkeypatch.setenv("QUALITY_SEEDS", "3")
    p = quality.plan("default", quality.QUALITY)
    assert p["variants"] == ["independent", "seed rule"] and p["datasets"] == ["wine"]
    assert p["seeds"] == [0, 1, 2]
    base = [o for o in quality.BASE if not o.startswith("policy.")]  # the seed rule's own
    assert p["overrides"]["seed rule"][: len(base)] == base  # policy replaces BASE's
    assert p["overrides"]["seed rule"][-1] == "tether.init=uniform"
    monkeypatch.setenv("QUALITY_VARIANTS", "indepndent")
    with pytest.raises(ValueError, match="QUALITY_VARIANTS: unknown"):
        quality.plan("default", quality.QUALITY)


def test_quality_recommends_one_row_for_all_datasets_by_relative_val_nll():
    from benchmarks import quality

    def row(val_nll):
        return {"n": 1, "seeds": [0], "val_nll": {"mean": val_nll, "values": [val_nll]}}

    rows = {  # "seed rule" wins big on one dataset and loses bigger on the other
        "digits": {"independent": row(0.08), "seed rule": row(0.12), "aligned": row(0.078)},
        "breast_cancer": {"independent": row(0.07), "seed rule": row(0.06), "aligned": row(0.069)},
    }
    assert quality.choose(rows, quality.QUALITY) == "aligned"
    rows["breast_cancer"]["seed rule"] = row(0.03)  # now it wins overall
    assert quality.choose(rows, quality.QUALITY) == "seed rule"
    del rows["breast_cancer"]["aligned"]  # a row must have run on every dataset
    rows["breast_cancer"]["seed rule"] = row(0.5)
    assert quality.choose(rows, quality.QUALITY) == "seed rule"  # the only one left, however bad
