"""CI smoke test of the benchmark suite: it runs and writes well-formed output.

Timings are never asserted (CI machines are noisy and shared); only that
every scenario ran, the files exist, and their structure is right.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastadam.bench import cli, report, scenarios  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "fastadam.bench", "--smoke", "--no-progress",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_smoke_writes_json(smoke):
    out, _ = smoke
    with open(out / "results.json") as f:
        res = json.load(f)
    meta = res["meta"]
    assert meta["mode"] == "smoke"
    assert meta["machine"]["cpu"]
    assert meta["machine"]["fastadam_config"]["isa"]
    assert meta["duration_s"] > 0
    bw = res["bandwidth"]["by_threads"]
    assert bw and all(v["bound_gbs"] > 0 for v in bw.values())
    recs = res["results"]
    seen = {r["scenario"] for r in recs}
    assert {"dense", "overhead", "many", "isa", "threshold", "threshold-summary"} <= seen
    for r in recs:
        if r["scenario"] == "threshold-summary":
            continue
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"], r
        assert r["impl"] and r["repeats"] >= 1
    dense = [r for r in recs if r["scenario"] == "dense" and r["impl"] == "fastadam"]
    assert {r["n"] for r in dense} == {2**4, 2**10, 2**14}
    for r in dense:
        assert r["ns_per_elem"] > 0 and r["pct_bound"] > 0 and r["bytes_per_elem"] == 28
    # sparse runs whenever one of its implementations is available here
    if any(r["scenario"] == "sparse" for r in recs):
        sp = [r for r in recs if r["scenario"] == "sparse"]
        assert all(r["touched_bytes"] > 0 and r["unique_rows"] > 0 for r in sp)


def test_smoke_writes_markdown_and_plots(smoke):
    out, stdout = smoke
    md = (out / "results.md").read_text()
    assert md.startswith("Machine:")
    assert "| elements |" in md and "| --- |" in md
    assert "Per-call overhead" in md and "Memory bandwidth" in md
    assert "Dense adam, float32" in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "dense_adam_float32_t{}.png".format(
            json.loads((out / "results.json").read_text())["meta"]["settings"]["threads"][-1])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_and_list():
    for flag in ("--help", "--list"):
        proc = subprocess.run([sys.executable, "-m", "fastadam.bench", flag], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "dense" in proc.stdout


def test_parse_sizes():
    assert cli.parse_sizes("2**16,1<<10,64K,1e6") == [1024, 65536, 10**6]
    assert cli.parse_sizes("2**4..2**7") == [16, 32, 64, 128]
    assert cli.parse_sparse("1000000x64x16384x1.1") == [(1_000_000, 64, 16384, 1.1)]


def test_zipf_ids_in_range_and_skewed():
    rng = np.random.default_rng(0)
    ids = scenarios.zipf_ids(rng, 1000, 5000, 1.1)
    assert ids.min() >= 0 and ids.max() < 1000
    assert np.unique(ids).size < 1000  # heavy duplicates
    uni = scenarios.zipf_ids(rng, 1000, 100, 0.0)
    assert uni.min() >= 0 and uni.max() < 1000
    half = scenarios.zipf_ids(rng, 1000, 100, 0.8)
    assert half.min() >= 0 and half.max() < 1000


def test_model_shapes():
    g = scenarios.gpt2_small_shapes()
    assert len(g) == 148 and sum(int(np.prod(s)) for s in g) == 124_439_808
    b = scenarios.bert_base_shapes()
    assert len(b) == 199 and sum(int(np.prod(s)) for s in b) == 109_482_240


def test_speedups_exclude_reference():
    base = dict(scenario="dense", variant="adam", dtype="float32", threads=2, n=16,
                min_s=1, max_s=1)
    recs = [dict(base, impl="fastadam", median_s=1.0), dict(base, impl="torch-fused", median_s=3.0),
            dict(base, impl="deepspeed", median_s=2.0), dict(base, impl="numpy-ref", median_s=0.5)]
    report.add_speedups(recs)
    assert recs[0]["best_peer"] == "deepspeed" and recs[0]["vs_best_peer"] == 2.0
