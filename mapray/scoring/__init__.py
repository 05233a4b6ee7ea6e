"""Scoring engines: one module per engine, the same small interface.

- `LogprobEngine.logprobs(sequences)`: for each (prompt_ids, response_ids), the sum over response tokens of
  log p(token | everything before it).
- `RewardEngine.rewards(sequences)`: for each full token sequence, the reward model's raw scalar (no sigmoid).

Engines receive token ids only: templating and truncation happen once, in `mapray.templates`, so every engine
scores exactly the same tokens.
"""

from __future__ import annotations

from typing import Protocol

from mapray.config import ModelConfig


class LogprobEngine(Protocol):
    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[float]: ...


class RewardEngine(Protocol):
    def rewards(self, sequences: list[list[int]]) -> list[float]: ...


def check_max_length(cfg: ModelConfig, local_path: str) -> None:
    """max_length beyond the model's positions would score garbage (RoPE) or crash (vLLM): refuse it."""
    import json
    from pathlib import Path

    config = json.loads((Path(local_path) / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    # the vLLM engine asks for one generated token after the scored sequence
    if positions is not None and cfg.max_length + (cfg.engine == "vllm") > positions:
        raise ValueError(f"max_length {cfg.max_length} exceeds what {local_path} supports ({positions} positions"
                         f"{', one kept for the vLLM engine' if cfg.engine == 'vllm' else ''})")


def load_logprob_engine(cfg: ModelConfig, local_path: str) -> LogprobEngine:
    check_max_length(cfg, local_path)
    if cfg.engine == "vllm":
        from mapray.scoring.vllm_engine import VllmLogprobEngine

        return VllmLogprobEngine(cfg, local_path)
    from mapray.scoring.torch_engine import TorchLogprobEngine

    return TorchLogprobEngine(cfg, local_path)


def load_reward_engine(cfg: ModelConfig, local_path: str) -> RewardEngine:
    check_max_length(cfg, local_path)
    if cfg.engine == "vllm":
        from mapray.scoring.vllm_engine import load_vllm_reward_engine

        return load_vllm_reward_engine(cfg, local_path)
    from mapray.scoring.torch_engine import TorchRewardEngine

    return TorchRewardEngine(cfg, local_path)
