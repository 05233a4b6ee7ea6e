"""The full pipeline on a GPU machine: local Ray, GPU actor pools (torch engine), one actor SIGKILLed mid-run.

Runs anywhere mapray's Python dependencies and Ray import (on the offline GPU machine, Ray comes from
../shared/tools/gpu-ray-bundle.sh). Builds a random-init ~100M-parameter Llama policy and reference and a reward
model, scores real UltraFeedback pairs with DPO, kills one policy actor after `--kill-after` seconds, and prints
one JSON line: counts, whether every pair came out exactly once, the killed PID, timings.

    python benchmarks/gpu_pipeline_check.py --pairs 400 --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
DATA = Path(__file__).resolve().parent.parent / "mapray" / "data" / "ultrafeedback-binarized-1000.jsonl"


def build_models(out: Path) -> dict[str, str]:
    """Random-init Llama checkpoints sharing the tiny test tokenizer (hidden 768, 8 layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from mapray.testing.tiny_models import build_tokenizer

    tok = build_tokenizer()
    base = dict(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    paths = {}
    for name, cls, seed, extra in (("policy", LlamaForCausalLM, 0, {}), ("reference", LlamaForCausalLM, 1, {}),
                                   ("reward", LlamaForSequenceClassification, 2,
                                    {"num_labels": 1, "id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0}})):
        torch.manual_seed(seed)
        model = cls(LlamaConfig(**base, **extra))
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        paths[name] = str(out / name)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--kill-after", type=float, default=6.0, help="seconds after the policy actor starts")
    parser.add_argument("--out", default="/tmp/mapray-gpu-check")
    parser.add_argument("--actors", type=int, default=2, help="policy actors sharing the GPU")
    args = parser.parse_args()

    import torch

    from mapray.config import load_config
    from mapray.pipeline import score
    from mapray.testing.faults import ActorKiller

    out = Path(args.out)
    models = build_models(out / "models")
    lines = DATA.read_bytes().splitlines()[: args.pairs]
    (out / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    gpu = torch.cuda.is_available()
    share = 1.0 / (args.actors + 2)  # policy actors + reference + reward share one GPU

    def model(path, actors=1):
        return {"path": path, "dtype": "bfloat16" if gpu else "float32", "device": "cuda" if gpu else "cpu",
                "max_length": 1024, "token_budget": 32768, "batch_size": 16, "actors": actors,
                "cpus_per_actor": 1.0 if gpu else 0.25, "gpus_per_actor": share if gpu else 0.0}

    cfg = load_config(None, base={
        "input": {"uri": str(out / "in.jsonl"), "columns": {"id": "prompt_id"}},
        "output": str(out / "result"), "policy": model(models["policy"], args.actors),
        "reference": model(models["reference"]), "reward": {"source": "model", "model": model(models["reward"])},
        "metric": {"implicit": "dpo"},
    })
    killer = ActorKiller("MapBatches(LogprobStage)", after_s=args.kill_after)
    killer.start()
    started = time.time()
    manifest = score(cfg)
    import pyarrow.parquet as pq

    # every input pair comes out exactly once: scored, or set aside in rejects/ (the sample has real defects)
    ids = pq.read_table(out / "result" / "scored").column("pair_id").to_pylist()
    if (out / "result" / "rejects").exists():
        ids += pq.read_table(out / "result" / "rejects").column("pair_id").to_pylist()
    expected = [json.loads(x)["prompt_id"] for x in lines]
    print(json.dumps({
        "check": "gpu_pipeline_actor_kill", "device": torch.cuda.get_device_name() if gpu else "cpu",
        "pairs": len(expected), "scored": manifest["counts"]["scored"], "rejected": manifest["counts"]["rejected"],
        "every_pair_exactly_once": collections.Counter(ids) == collections.Counter(expected),
        "killed_pid": killer.killed, "killed_after_s": round(killer.killed_at - started, 1) if killer.killed else None,
        "total_s": round(time.time() - started, 1), "pairs_per_s": manifest["pairs_per_s"],
    }), flush=True)


if __name__ == "__main__":
    main()
