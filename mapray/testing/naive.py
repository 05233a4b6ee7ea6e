"""The naive computations the engines are checked against: full-vocabulary logits, no chunking, no sorting.

This is the common trainer recipe (chosen and rejected padded together, `log_softmax` over every position),
kept as the correctness reference for tests and the baseline for benchmarks.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def naive_logprobs(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 8,
                   softmax_dtype: torch.dtype = torch.float64) -> list[float]:
    """Sum of log p(response token | prefix) from full logits over padded batches in input order.

    The default float64 log_softmax makes this the exact reference: an fp32 log_softmax over a 49k vocabulary
    drifts by ~1e-6 per token, 5e-4 over a 250-token response (seen on SmolLM2). Trainers use float32.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, (p, r) in enumerate(chunk):
            ids[b, :len(p) + len(r)] = torch.tensor(p + r)
            mask[b, :len(p) + len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.to(softmax_dtype)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None].to(device))[..., 0]
        for b, (p, r) in enumerate(chunk):
            out.append(float(logp[b, len(p) - 1:len(p) + len(r) - 1].double().sum()))
    return out


@torch.inference_mode()
def naive_reward(model, ids: list[int]) -> float:
    """One unpadded sequence through a sequence-classification model: its single raw logit."""
    device = next(model.parameters()).device
    return float(model(input_ids=torch.tensor([ids], device=device)).logits[0, 0])
