"""`mapray estimate`: what a run will cost before it runs, from a real sample of its input and its models' configs.

1. rows: Parquet footers (exact), or JSONL file sizes over the sample's mean line size (estimated); `input.limit`
   caps them;
2. tokens: each sampled row normalized as the run would read it and encoded by each model's own tokenizer and chat
   template, truncated to its max_length: per pair, the prompt once where the engine shares it (torch engine with
   `prefix_sharing`, and the reward engine, which packs both responses behind one prompt), twice elsewhere (vLLM
   computes a request with prompt log-probs from scratch);
3. FLOPs: 2 x non-embedding parameters x tokens, plus the LM head (2 x hidden x vocabulary) on every scored response
   token of a log-prob model; parameters counted on PyTorch's meta device from the checkpoint's config (no weights);
4. time: FLOPs over (devices x measured peak x measured fraction of it) for a kind of device `MEASURED` holds, with
   the figure's source and date printed beside it; a kind without one gets FLOPs and tokens, and says so.
Model loading and the run's fixed cost (Ray start, normalize, global pass: seconds, whatever the pool) are not in
it, and the printed estimate says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mapray.config import ModelConfig, RunConfig, configured_models
from mapray.errors import ConfigError

# Measured figures (benchmarks/README.md), per kind of device and dtype: the matmul peak and the fraction of it
# the torch engine's useful FLOPs reached, counted as the figure was (`prompt`: "once" per pair, or "per_sequence":
# once per response, the engine before prefix sharing), with what was measured and when.
MEASURED = {
    ("h200", "bfloat16"): {
        "device": "NVIDIA H200", "peak_tflops": 810.4, "fraction": 0.497, "prompt": "per_sequence",
        "date": "2026-11-27", "what": "bf16 matmul peak; the torch engine at 8B on synthetic lengths, before prefix "
                                      "sharing and packing (benchmarks/results/2026-11-27-h200.jsonl)"},
    ("cpu", "bfloat16"): {
        "device": "2-core AMD EPYC (AVX-512, AMX), this project's CI machine", "peak_tflops": 0.4146,
        "fraction": 0.248, "prompt": "once", "date": "2026-12-05",
        "what": "bf16 matmul peak on 2 threads; the torch engine on SmolLM2-135M, 32 UltraFeedback pairs "
                "(benchmarks/results/2026-12-05-cpu-estimate-figures.jsonl)"},
    ("cpu", "float32"): {
        "device": "2-core AMD EPYC (AVX-512, AMX), this project's CI machine", "peak_tflops": 0.183,
        "fraction": 0.376, "prompt": "once", "date": "2026-12-05",
        "what": "fp32 matmul peak on 2 threads; the torch engine on SmolLM2-135M, 32 UltraFeedback pairs "
                "(benchmarks/results/2026-12-05-cpu-estimate-figures.jsonl)"},
}


@dataclass
class ModelCost:
    key: str
    params: int  # non-embedding
    hidden: int
    vocab: int
    sampled_pairs: int
    tokens_per_pair: float  # processed per pair, the prompt once where shared
    response_tokens_per_pair: float
    sequence_tokens_per_pair: float  # the prompt counted once per response

    def flops_per_pair(self, log_probs: bool, tokens: float | None = None) -> float:
        head = 2 * self.hidden * self.vocab * self.response_tokens_per_pair if log_probs else 0.0
        return 2 * self.params * (self.tokens_per_pair if tokens is None else tokens) + head


def estimate(cfg: RunConfig, kind: str, devices: int, sample_rows: int = 256) -> dict:
    """The estimate as a dict (`render` prints it)."""
    from mapray.api import Scorer
    from mapray.inputs import discover, sample_records

    if devices < 1:
        raise ConfigError(f"--devices: must be at least 1, got {devices}")
    scorer = Scorer(cfg)
    files = discover(cfg.input)
    sample = sample_records(files, sample_rows)
    if not sample:
        raise ConfigError(f"input.uri: no row of {files.uris[0]} could be read to estimate from")
    shape = scorer.shape(sample, source=files.uris[0])
    rows, exact = _rows(files, sample)
    if cfg.input.limit is not None:
        rows, exact = min(rows, cfg.input.limit), exact or rows >= cfg.input.limit
    pairs = _pairs(sample, shape.spec)
    configured = dict(configured_models(cfg))
    models = {key: _cost(key, model, pairs, shares_prompt=key.startswith("reward") or _shares(model))
              for key, model in configured.items()}
    flops = sum(rows * m.flops_per_pair(log_probs=not k.startswith("reward")) for k, m in models.items())
    out = {"rows": rows, "rows_exact": exact, "sampled_rows": len(sample), "usable_sampled_pairs": len(pairs),
           "models": {k: {"non_embedding_params": m.params, "tokens_per_pair": round(m.tokens_per_pair, 1),
                          "tokens": round(rows * m.tokens_per_pair)} for k, m in models.items()},
           "flops": flops, "kind": kind, "devices": devices}
    dtypes = sorted({model.dtype for model in configured.values()})
    figures = {d: MEASURED.get((kind, d)) for d in dtypes}
    missing = [d for d, f in figures.items() if f is None]
    if missing:
        known = ", ".join(f"{k} {d}" for k, d in MEASURED)
        out["unmeasured"] = (f"no measured figure for {kind} in {', '.join(missing)} (measured: {known}): run "
                             "benchmarks/gpu_run.sh (a GPU) or bench_scoring.py with matmul_peak.py on one to add it")
        return out
    seconds = 0.0
    for key, m in models.items():  # each model at the rate measured for its dtype, counted as the figure counts
        figure = figures[configured[key].dtype]
        tokens = m.sequence_tokens_per_pair if figure["prompt"] == "per_sequence" else None
        work = rows * m.flops_per_pair(log_probs=not key.startswith("reward"), tokens=tokens)
        seconds += work / (devices * figure["peak_tflops"] * 1e12 * figure["fraction"])
    out.update(figures=[figures[d] for d in dtypes], wall_s=seconds, device_hours=seconds * devices / 3600)
    return out


def _rows(files, sample: list[dict]) -> tuple[int, bool]:
    import fsspec
    import pyarrow.parquet as pq

    if files.file_format == "parquet":
        total = 0
        for uri in files.uris:
            fs, path = fsspec.core.url_to_fs(uri)
            total += pq.read_metadata(path, filesystem=fs).num_rows
        return total, True
    line_bytes = sum(len(json.dumps(rec, ensure_ascii=False).encode()) + 1 for rec in sample) / len(sample)
    size = sum(size or 0 for _, size, _ in files.listing())
    return max(len(sample), round(size / line_bytes)), False


def _pairs(sample: list[dict], spec) -> list:
    import dataclasses

    from mapray.formats import RejectRow, assistant, normalize_record

    pairs = []
    for rec in sample:
        try:
            pair = normalize_record(rec, spec.format, spec.columns)
        except RejectRow:
            continue
        if pair.candidates is not None:  # an N-candidates row: a pair of two of its candidates stands for it
            ends = (pair.candidates[0], pair.candidates[-1])
            first, last = (assistant(c) if pair.conversational else c for c in ends)
            pair = dataclasses.replace(pair, chosen=first, rejected=last)
        pairs.append(pair)
    if not pairs:
        raise ConfigError("input: none of the sampled rows is a pair mapray would score")
    return pairs


def _shares(model: ModelConfig) -> bool:
    return model.engine == "torch" and model.prefix_sharing


def _cost(key: str, model: ModelConfig, pairs: list, shares_prompt: bool) -> ModelCost:
    from mapray.stages import load_encoder

    encoder, local = load_encoder(model)
    params, hidden, vocab = _shape(local)
    from mapray.formats import RejectRow

    processed = responses = sequences = 0
    for pair in pairs:  # a pair the model's stage would set aside costs nothing: it counts as 0 tokens
        try:
            encoded = encoder.encode_pair(pair.prompt, pair.chosen, pair.rejected)
        except RejectRow:
            continue
        (p1, r1), (p2, r2) = encoded.sequences()
        responses += len(r1) + len(r2)
        sequences += len(p1) + len(p2) + len(r1) + len(r2)
        processed += len(r1) + len(r2) + (max(len(p1), len(p2)) if shares_prompt else len(p1) + len(p2))
    n = len(pairs)
    return ModelCost(key, params, hidden, vocab, n, processed / n, responses / n, sequences / n)


def _shape(local: str) -> tuple[int, int, int]:
    """(non-embedding parameters, hidden size, vocabulary) of a checkpoint, from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(local)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    params = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    return params, config.hidden_size, config.vocab_size


def render(result: dict) -> str:
    rows = f"{result['rows']:,}" + ("" if result["rows_exact"] else " (estimated from the files' sizes)")
    lines = [f"mapray estimate: {rows} pairs; from {result['usable_sampled_pairs']} sampled pairs "
             f"({result['sampled_rows']} rows read)"]
    for key, m in result["models"].items():
        lines.append(f"  {key:<13} {m['non_embedding_params'] / 1e6:,.0f}M params, {m['tokens_per_pair']:,.0f} "
                     f"tokens/pair, {m['tokens']:,} tokens")
    lines.append(f"  compute       {result['flops']:.3g} FLOPs")
    if "unmeasured" in result:
        lines.append(f"  time          {result['unmeasured']}")
        return "\n".join(lines)
    lines.append(f"  time          {_duration(result['wall_s'])} on {result['devices']} x {result['kind']}, "
                 f"{result['device_hours']:.3g} device-hours (model pass; loading and fixed costs not included)")
    for fig in result["figures"]:
        lines.append(f"  figure used   {fig['fraction']:.1%} of {fig['peak_tflops']:g} TFLOP/s on {fig['device']}, "
                     f"measured {fig['date']}: {fig['what']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
