"""Scoring engines: one module per engine, the same small interface.

- `LogprobEngine.logprobs(sequences)`: for each (prompt_ids, response_ids), the sum over response tokens of
  log p(token | everything before it).
- `RewardEngine.rewards(sequences)`: for each full token sequence, the reward model's raw scalar (no sigmoid);
  `label_scores(sequences)`: every label's raw score (a multi-objective head has several).

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

    def label_scores(self, sequences: list[list[int]]) -> list[list[float]]: ...


def check_max_length(cfg: ModelConfig, local_path: str, key: str) -> None:
    """The preflight's rule (`mapray.preflight.check_positions`) where the model loads: a second line of defence
    for engines built without a run's preflight."""
    from mapray.preflight import check_positions, read_model_files

    check_positions(key, cfg, read_model_files(local_path, f"{key}.path"))


def load_logprob_engine(cfg: ModelConfig, local_path: str, key: str = "policy") -> LogprobEngine:
    check_max_length(cfg, local_path, key)
    if cfg.engine == "vllm":
        from mapray.scoring.vllm_engine import VllmLogprobEngine

        return VllmLogprobEngine(cfg, local_path)
    from mapray.scoring.torch_engine import TorchLogprobEngine

    return TorchLogprobEngine(cfg, local_path)


def load_reward_engine(cfg: ModelConfig, local_path: str, key: str = "reward.model") -> RewardEngine:
    check_max_length(cfg, local_path, key)
    if cfg.engine == "vllm":
        from mapray.scoring.vllm_engine import load_vllm_reward_engine

        return load_vllm_reward_engine(cfg, local_path)
    from mapray.scoring.torch_engine import TorchRewardEngine

    return TorchRewardEngine(cfg, local_path)
