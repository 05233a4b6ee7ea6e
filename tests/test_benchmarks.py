"""The benchmark scripts still run (they are what a lent GPU session executes, once): a tiny shape on the CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_scoring_tiny_shape_prints_one_exact_row_per_method():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_scoring.py", "--shape", "tiny", "--pairs", "6", "--methods",
         "naive,torch,torch-nosharing,torch-nopacking,torch-padded", "--engine-batch", "4", "--peak-tflops", "1",
         "--check-pairs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["method"] for r in rows] == ["naive", "torch", "torch-nosharing", "torch-nopacking", "torch-padded"]
    for r in rows:
        assert r["pairs"] == 6 and r["pairs_per_s"] > 0
        assert r["max_abs_diff_vs_exact"] < 1e-4  # float32 tiny model against the float64 reference
        # counting each prompt once leaves less useful work for the same time
        assert r["tokens_prompt_once"] < r["tokens"]
        assert r["fraction_of_peak_shared"] <= r["fraction_of_peak"]


def test_bench_scoring_takes_real_length_spreads():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_scoring.py", "--shape", "tiny", "--pairs", "5", "--methods",
         "torch,torch-padded", "--lengths", "benchmarks/lengths/hh-rlhf-harmless-smollm2.jsonl",
         "--max-length", "512", "--check-pairs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    lengths = [json.loads(line) for line in (ROOT / "benchmarks/lengths/hh-rlhf-harmless-smollm2.jsonl")
               .read_text().splitlines()[:5]]
    assert all(r["tokens"] == sum(2 * p + c + r_ for p, c, r_ in lengths) for r in rows)  # all under 512
    assert all(r["max_abs_diff_vs_exact"] < 1e-4 for r in rows)


def test_padding_model_finds_sharing_and_packing_cheapest():
    out = subprocess.run(
        [sys.executable, "benchmarks/padding_model.py", "--lengths",
         "benchmarks/lengths/hh-rlhf-harmless-smollm2.jsonl", "--budgets", "32768"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    rows = {(r["prefix_sharing"], r["packing"]): r for r in map(json.loads, out.stdout.splitlines())}
    assert len(rows) == 4
    assert rows[True, True]["padding"] < 0.1 < rows[False, False]["padding"]
    assert min(rows.values(), key=lambda r: r["flops_vs_ideal_8b"]) is rows[True, True]
    assert rows[True, True]["flops_vs_ideal_8b"] >= 1.0  # never below the ideal


def test_bench_scale_pool_has_the_real_length_spread_in_tokens(tmp_path):
    """The scale benchmark's pool (its phases run the real CLI: measured by running it, see benchmarks/README.md;
    three CLI runs cost minutes, which the suite's budget gives to the cache and S3 tests instead)."""
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from mapray.testing.tiny_models import build_tokenizer

    bench.write_pool(tmp_path / "pool", 50, seed=3, max_length=64, rows_per_file=20, reuse=False)
    files = sorted((tmp_path / "pool").glob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert [pq.read_metadata(f).num_rows for f in files] == [20, 20, 10] and table.num_rows == 50
    assert len(set(table["id"].to_pylist())) == 50
    tokenizer = build_tokenizer()
    counts = np.array([[len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in row]
                       for row in zip(*(table[c].to_pylist() for c in ("prompt", "chosen", "rejected")))])
    assert counts.max() <= 64 // 2 - 2 + 2 and counts.min() >= 1  # capped at half of max_length, within 2 tokens
    assert len(np.unique(counts[:, 1])) > 5  # a spread, not one length
    before = files[0].stat().st_mtime_ns
    bench.write_pool(tmp_path / "pool", 50, seed=3, max_length=64, rows_per_file=20, reuse=True)
    assert files[0].stat().st_mtime_ns == before  # the same settings: the pool is kept


def _gpu_run(tmp_path, **env):
    import os

    out = tmp_path / "out"
    subprocess.run(["bash", "benchmarks/gpu_run.sh", "--tiny"], cwd=ROOT, check=True, timeout=600,
                   capture_output=True, text=True,
                   env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return out, [(s["step"], s["rc"]) for s in steps]


def test_gpu_run_script_runs_its_plans_on_the_tiny_shape(tmp_path):
    """What a lent GPU session runs, end to end on the CPU (the pipeline step, ~2 min here, is run by hand:
    benchmarks/README.md)."""
    out, steps = _gpu_run(tmp_path, GPU_RUN_SKIP="pipeline extra")
    assert steps == [("core-tiny", 0), ("long-tiny", 0), ("pipeline", "skipped"), ("peers-tiny", 0),
                     ("extra-tiny", "skipped")]
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    plan = [json.loads(line) for line in (out / "plan-core.jsonl").read_text().splitlines()]
    long_case = json.loads((out / "plan-long.jsonl").read_text())
    peers_case = json.loads((out / "plan-peers.jsonl").read_text())
    # one row per method of each case, as each finished: the core plan, the long responses, then TRL beside the
    # engine (the 1B shape's core step runs the core plan again on a GPU; tiny has one shape)
    core = [(case["token_budget"], m) for case in plan for m in case["methods"].split(",")]
    assert [(r["token_budget"], r["method"]) for r in rows] == core + [
        (32768, m) for m in long_case["methods"].split(",")] + [(32768, "torch"), (32768, "trl")]
    assert {r["method"] for r in rows} == {"naive", "torch", "torch-nosharing", "torch-nopacking", "torch-padded",
                                            "torch-flex", "torch-flex-nosharing", "trl"}
    for r in rows:
        assert "error" not in r, r
        # float32 tiny model against the float64 reference; TRL's chunked fused LM head sums its float32
        # per-token log-probs in another order (~1e-4 over a few hundred tokens)
        assert r["max_abs_diff_vs_exact"] < (1e-3 if r["method"] == "trl" else 1e-4)
    long_rows = [r for r in rows if r.get("case") == long_case]
    assert [r["method"] for r in long_rows] == ["torch", "torch-flex", "naive"]
    assert all(r["pairs"] == 2 and r["tokens"] == 2 * 2 * (64 + 600) for r in long_rows)
    # TRL's precompute on the core plan's first pairs: the same tokens, its construction timed apart
    peers = [r for r in rows if r.get("case") == peers_case]
    assert [r["method"] for r in peers] == ["torch", "trl"] and peers[1]["setup_s"] >= 0
    assert {r["tokens"] for r in peers} == {rows[0]["tokens"]}
    # the README's tables, one per case, speed-ups against the same case's naive row
    blocks = subprocess.run([sys.executable, "benchmarks/scoring_tables.py", str(out / "bench.jsonl")], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip().split("\n\n")
    titles, tables = blocks[0::2], blocks[1::2]  # a bold title, then its table
    assert len(titles) == len(tables) == len(plan) + 2 and all(t.startswith("**tiny, 6 pairs") for t in titles[:-2])
    assert titles[-1].endswith("token budget 32,768, torch and trl in one process**")
    first = {line.split(" | ")[0][2:]: line.split(" | ") for line in tables[0].splitlines() if line.startswith("| ")}
    assert set(first) == {"method"} | set(plan[0]["methods"].split(","))
    naive, flex = (float(first[m][1]) for m in ("naive", "torch-flex"))
    assert first["naive"][2] == "1.00×" and float(first["torch-flex"][2][:-1]) == pytest.approx(flex / naive, rel=0.02)
    assert titles[len(plan) - 1].endswith("token budget 65,536, lm_head_chunk 16,384**")


def test_gpu_run_script_stops_at_its_time_limit_and_skips_by_name(tmp_path):
    out, steps = _gpu_run(tmp_path, GPU_RUN_SECONDS="1", GPU_RUN_SKIP="long-tiny")
    assert steps == [("core-tiny", "no time left"), ("long-tiny", "skipped"), ("pipeline", "no time left"),
                     ("peers-tiny", "no time left"), ("extra-tiny", "no time left")]
    assert not (out / "bench.jsonl").exists()
