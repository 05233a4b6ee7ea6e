"""Run configuration: frozen dataclasses loaded from YAML, with `--set a.b=value` overrides.

Every key is checked against the dataclass fields and its declared type before anything runs, so a typo or a
wrong type stops the run with one line naming the key (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key or path."""


@dataclass(frozen=True)
class ColumnNames:
    """Names of the input's columns; each format reads the ones it needs."""

    id: str | None = None  # an id column to use as pair_id; None: a stable hash of the canonical content
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    score_chosen: str = "score_chosen"
    score_rejected: str = "score_rejected"
    responses: str = "all_generated_responses"  # N-candidates format
    scores: str = "all_rm_scores"


@dataclass(frozen=True)
class InputConfig:
    uri: str | list[str] = ""  # file, folder, glob or list of them; any fsspec/pyarrow URI
    format: Literal["auto", "text", "chat", "transcript", "candidates"] = "auto"
    file_format: Literal["auto", "parquet", "jsonl"] = "auto"  # auto: by file extension
    columns: ColumnNames = field(default_factory=ColumnNames)
    limit: int | None = None  # score only the first N input rows (demos, smoke runs)
    schema_sample_rows: int = 1000  # JSONL: rows read to infer the types of the input's own columns
    max_row_chars: int = 1_000_000  # a row whose prompt + responses are longer is set aside, not tokenized


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local dir, fsspec URI of a HF checkpoint dir, a .gguf file, or pkg:PACKAGE/FILE
    engine: Literal["torch", "vllm"] = "torch"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: int = 2048  # prompt + response tokens; longer pairs are cut like trainers cut them
    max_prompt_length: int | None = None  # default: max_length // 2
    token_budget: int = 16384  # padded tokens per forward pass (torch engine)
    lm_head_chunk: int = 4096  # response positions per LM-head chunk (bounds the vocab-sized logits)
    prefix_sharing: bool = True  # torch engine: a pair's prompt runs once for both responses (tree mask)
    packing: bool = True  # torch engine: short sequences side by side in one row of a batch, not padded
    chat_template: str | None = None  # overrides the tokenizer's template (Jinja text)
    batch_size: int = 64  # rows per Ray Data batch sent to an actor
    actors: int = 1  # actor pool size
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    tensor_parallel_size: int = 1  # vllm engine only
    max_num_batched_tokens: int = 8192  # vllm engine only: bounds prompt-logprob memory per step
    gpu_memory_utilization: float = 0.85  # vllm engine only


@dataclass(frozen=True)
class RewardConfig:
    source: Literal["columns", "model"] = "columns"  # columns: scores from the input; model: a reward model
    model: ModelConfig | None = None


@dataclass(frozen=True)
class MetricConfig:
    implicit: Literal["simpo", "dpo"] = "simpo"
    beta: float | None = None  # None: 2.0 for simpo (SimPO's beta), 0.1 for dpo
    alpha: float = 1.0  # weight of the implicit term in MAP (reference code default)

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 2.0 if self.implicit == "simpo" else 0.1

    @property
    def needs_reference_model(self) -> bool:
        return self.implicit == "dpo"


SelectionMetric = Literal["map_z", "map", "explicit_margin", "implicit_margin_small", "map_unreg", "random"]


@dataclass(frozen=True)
class SelectionConfig:
    metric: SelectionMetric = "map_z"
    ratio: float | None = 0.4  # fraction of the scored pool to keep (reference default)
    top_k: int | None = None  # keep exactly k rows instead of a ratio
    seed: int = 0  # for metric "random"


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: connect to RAY_ADDRESS if set, else start an embedded local Ray
    num_cpus: int | None = None  # embedded Ray only
    env_vars: dict[str, str] = field(default_factory=dict)  # passed to every worker (runtime_env)


@dataclass(frozen=True)
class RunConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: str = ""  # output URI: scored/, selected/, rejects/, manifest.json go under it
    policy: ModelConfig = field(default_factory=ModelConfig)
    reference: ModelConfig | None = None
    reward: RewardConfig = field(default_factory=RewardConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # scores reused across runs, keyed by model content hash and token ids (see mapray/cache.py); with it, a
    # rescoring run after a policy update reruns only the policy
    cache: str | None = None


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Reads a YAML file (or starts from `base`), applies `key.sub=value` overrides, validates."""
    data: dict = dict(base or {})
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        data.update(loaded)
    for item in overrides:
        _apply_override(data, item)
    cfg = from_dict(RunConfig, data, "")
    return validate(cfg)


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw else ""


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass `cls` from plain data, checking keys and types; `where` names the key in errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])} (known: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def validate(cfg: RunConfig) -> RunConfig:
    """Checks the relations between keys that types alone cannot express."""
    if not cfg.input.uri:
        raise ConfigError("input.uri is required")
    if not cfg.output:
        raise ConfigError("output is required (an output URI)")
    if not cfg.policy.path:
        raise ConfigError("policy.path is required")
    if cfg.metric.needs_reference_model and cfg.reference is None:
        raise ConfigError("metric.implicit=dpo needs a reference model: set reference.path")
    if cfg.reference is not None and not cfg.reference.path:
        raise ConfigError("reference.path is required when a reference section is given")
    if cfg.reward.source == "model" and (cfg.reward.model is None or not cfg.reward.model.path):
        raise ConfigError("reward.source=model needs reward.model.path")
    sel = cfg.selection
    if sel.top_k is None and sel.ratio is None:
        raise ConfigError("selection: set ratio or top_k")
    if sel.top_k is not None and sel.top_k < 0:
        raise ConfigError(f"selection.top_k: must be >= 0, got {sel.top_k}")
    if sel.top_k is None and not 0.0 <= sel.ratio <= 1.0:
        raise ConfigError(f"selection.ratio: must be in [0, 1], got {sel.ratio}")
    for name, model in configured_models(cfg):
        _validate_model(name, model)
    return cfg


def configured_models(cfg: RunConfig) -> list[tuple[str, ModelConfig]]:
    models = [("policy", cfg.policy)]
    if cfg.reference is not None:
        models.append(("reference", cfg.reference))
    if cfg.reward.source == "model" and cfg.reward.model is not None:
        models.append(("reward.model", cfg.reward.model))
    return models


def _validate_model(name: str, m: ModelConfig) -> None:
    positive = {"max_length": m.max_length, "token_budget": m.token_budget, "batch_size": m.batch_size,
                "actors": m.actors, "lm_head_chunk": m.lm_head_chunk,
                "tensor_parallel_size": m.tensor_parallel_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}.{key}: must be >= 1, got {value}")
    if m.max_prompt_length is not None and not 1 <= m.max_prompt_length < m.max_length:
        raise ConfigError(f"{name}.max_prompt_length: must be in [1, max_length), got {m.max_prompt_length}")
    if m.token_budget < m.max_length:
        raise ConfigError(f"{name}.token_budget ({m.token_budget}) must be >= max_length ({m.max_length})")
    if m.cpus_per_actor < 0 or m.gpus_per_actor < 0:
        raise ConfigError(f"{name}: cpus_per_actor and gpus_per_actor must be >= 0")


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
