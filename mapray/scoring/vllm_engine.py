"""The vLLM engine: prompt log-probs and reward scores from a vLLM `LLM` per actor.

Log-probs: each (prompt, response) goes in as token ids (the token convention of `mapray.templates`, so no
re-templating and no double BOS), with `SamplingParams(max_tokens=1, prompt_logprobs=0)`; entry j of
`prompt_logprobs` is log p(t_j | t_<j) of the actual token (entry 0 is None), so the response sum is over
j in [len(prompt), len(prompt) + len(response)). Prefix caching is off: cached prefixes get no prompt log-probs.
`max_num_batched_tokens` bounds the tokens per engine step, and so the full-vocabulary prompt logits vLLM
materialises for them (tokens x vocab x 4 bytes: 8192 x 49k x 4 = 1.6 GB for SmolLM2, 4 GB at a 128k vocab).

Rewards: `runner="pooling"` turns a single-label `*ForSequenceClassification` checkpoint into a classify model;
`PoolingParams(use_activation=False)` returns the raw logit (without it a one-label head returns a sigmoid).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mapray.config import ModelConfig

log = logging.getLogger(__name__)


def engine_kwargs(cfg: ModelConfig, local_path: str, max_model_len: int) -> dict:
    kwargs = {
        "model": local_path, "dtype": cfg.dtype, "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": max_model_len, "enable_prefix_caching": False, "seed": 0,
        "max_num_batched_tokens": max(cfg.max_num_batched_tokens, max_model_len),
        "use_tqdm_on_load": False,  # a weight-loading bar per actor, interleaved on the driver's terminal
    }
    import torch

    if torch.cuda.is_available() and cfg.device != "cpu":
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True  # CPU backend: no graph capture
    if cfg.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "ray"  # shards placed by Ray, inside this actor's cluster
    return kwargs


def start_engine(kwargs: dict, what: str):
    import warnings

    # vLLM's Triton dispatcher touches a deprecated torch attribute on import, once per actor: not the user's to act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)
    from vllm import LLM

    try:
        return LLM(**kwargs)
    except Exception as e:  # an engine that cannot start must end the job with a reason, not hang it
        raise RuntimeError(f"vLLM could not start the {what} engine for {kwargs['model']}: {_reason(e)}") from e


def _reason(e: Exception) -> str:
    """The informative line of an engine error (pydantic puts it after a '1 validation error' header)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "validation error" not in ln and not ln.startswith("For further")]
    return (useful or lines or [type(e).__name__])[0][:300]


class VllmLogprobEngine:
    def __init__(self, cfg: ModelConfig, local_path: str):
        self.llm = start_engine(engine_kwargs(cfg, local_path, cfg.max_length + 1), "log-prob")

    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # all requests go in at once: vLLM's scheduler keeps the engine saturated within its token bound
        prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in sequences]
        outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        sums = []
        for (prompt, response), out in zip(sequences, outputs):
            ids = prompt + response
            entries = out.prompt_logprobs
            sums.append(sum(entries[j][ids[j]].logprob for j in range(len(prompt), len(ids))))
        return sums


class VllmRewardEngine:
    def __init__(self, cfg: ModelConfig, local_path: str):
        kwargs = engine_kwargs(cfg, local_path, cfg.max_length)
        self.llm = start_engine({**kwargs, "runner": "pooling"}, "reward")

    def rewards(self, sequences: list[list[int]]) -> list[float]:
        """The raw score of the first label of each sequence: the reward of a single-label head."""
        return [scores[0] for scores in self.label_scores(sequences)]

    def label_scores(self, sequences: list[list[int]]) -> list[list[float]]:
        """The raw score of every label (no activation), for each sequence."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.classify([TokensPrompt(prompt_token_ids=s) for s in sequences],
                                    pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return [[float(v) for v in o.outputs.probs] for o in outputs]


def vllm_supports(local_path: str, runner: str) -> tuple[bool, str]:
    """Whether vLLM has an implementation for the checkpoint's architecture (custom heads such as ArmoRM's
    do not), decided from config.json before an engine is started."""
    from vllm import ModelRegistry

    config = json.loads((Path(local_path) / "config.json").read_text())
    archs = config.get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())

    def known(arch: str) -> bool:
        # vLLM builds *ForSequenceClassification from the registered *ForCausalLM of the same family
        seq_cls = arch.removesuffix("ForSequenceClassification") + "ForCausalLM"
        return arch in supported or (arch.endswith("ForSequenceClassification") and seq_cls in supported)

    if not archs or not any(known(a) for a in archs):
        return False, f"architecture {archs or '(none)'} is not implemented in vLLM"
    if runner == "pooling" and not any(a.endswith("ForSequenceClassification") for a in archs):
        return False, f"architecture {archs} is not a sequence-classification reward model"
    return True, ""


def load_vllm_reward_engine(cfg: ModelConfig, local_path: str):
    ok, why = vllm_supports(local_path, "pooling")
    if not ok:
        from mapray.scoring.torch_engine import TorchRewardEngine

        log.warning("reward model %s: %s; falling back to the torch engine", local_path, why)
        return TorchRewardEngine(cfg, local_path)
    return VllmRewardEngine(cfg, local_path)
