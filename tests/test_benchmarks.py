"""The benchmark scripts still run (they are what a lent GPU session executes, once): a tiny shape on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

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
