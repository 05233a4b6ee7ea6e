"""Run configuration: frozen dataclasses loaded from YAML, with `--set a.b=value` overrides.

Every key is checked against the dataclass fields and its declared type before anything runs, so a typo or a
wrong type stops the run with one line naming the key (`ConfigError`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key or path."""

    def __init__(self, message: str = ""):
        # one line whatever it quotes (a path or value with a line break in it): the CLI prints one line
        super().__init__("\\n".join(str(message).splitlines()))


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
    # a column whose non-null value sets its row aside with that value as the reason (stage "generate"):
    # `mapray selfplay` scores its generated/ rows with error=generation_error
    error: str | None = None


@dataclass(frozen=True)
class InputConfig:
    uri: str | list[str] = ""  # file, folder, glob or list of them; any fsspec/pyarrow URI
    # TRL's types (standard: strings, conversational: message lists; each with an explicit or implicit prompt),
    # Anthropic HH transcripts, N candidates per prompt; auto: told apart from the first rows (mapray/formats.py)
    # (prompts: a prompt column only, for `mapray selfplay`)
    format: Literal["auto", "standard", "conversational", "transcript", "candidates", "prompts"] = "auto"
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
    max_length: int = 2048  # prompt + response tokens per sequence; longer ones are cut as TRL's DPOTrainer cuts them
    # keep_start (TRL's default): a sequence keeps its first max_length tokens, and a pair whose prompt alone fills
    # max_length is set aside (TRL drops it); keep_end: a sequence keeps its last max_length tokens
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    # False (TRL's behaviour): special-token text inside a row (e.g. "<|im_start|>") becomes that special token;
    # True: row text is strictly text, only the chat template's own markup yields special tokens
    split_special_tokens: bool = False
    token_budget: int = 16384  # padded tokens per forward pass (torch engine)
    lm_head_chunk: int = 4096  # response positions per LM-head chunk (bounds the vocab-sized logits)
    prefix_sharing: bool = True  # torch engine: a pair's prompt runs once for both responses (tree mask)
    packing: bool = True  # torch engine: short sequences side by side in one row of a batch, not padded
    # torch engine: how sharing/packing rows attend. mask: a dense rows x width^2 mask through SDPA (rows up to
    # 8,192 tokens, packed to the longest); flex: PyTorch FlexAttention with a block mask (tiles no query sees
    # are skipped, rows packed up to token_budget; compiled on first use). The same values either way.
    tree_attention: Literal["mask", "flex"] = "mask"
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


# The one list of selection metric names: `mapray select --metric` offers these (typing.get_args), and
# metrics.selection_score ranks by the column of that name, by one computed from the two margins
# (metrics.FROM_MARGINS: the literature's rules, formulas and sources in metrics' docstring), or randomly.
SelectionMetric = Literal["map_z", "map", "map_unreg", "explicit_margin", "implicit_margin_small", "random",
                          "implicit_margin_large", "dpo_loss", "dpo_grad_weight", "rm_confidence",
                          "rank_disagreement"]
DEFAULT_RATIO = 0.4  # the reference code's default


@dataclass(frozen=True)
class SelectionConfig:
    """Which rows to keep: set at most one of ratio, top_k, threshold; none set keeps ratio DEFAULT_RATIO."""

    metric: SelectionMetric = "map_z"
    ratio: float | None = None  # keep the top fraction of the scored pool, floor(ratio * n) rows
    top_k: int | None = None  # keep the top k rows
    threshold: float | None = None  # keep every row whose selection score exceeds it (the paper's MAP > tau)
    seed: int = 0  # for metric "random"

    @property
    def rule(self) -> tuple[str, float]:
        """(name, value) of the rule in force: the one set, else ratio DEFAULT_RATIO."""
        for name in ("ratio", "top_k", "threshold"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return "ratio", DEFAULT_RATIO


@dataclass(frozen=True)
class GenerationConfig:
    """Self-play sampling (`mapray selfplay`); the defaults are the reference code's (`gen_pair_data.py`)."""

    n: int = 5  # samples per prompt
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 4096  # per sample; a sample also stops where the generator's max_length ends
    seed: int = 0  # with the prompt's id, the seed of each prompt's samples: a rerun samples the same
    # take the policy's log-probs of the picked pair from the generation pass instead of a scoring pass: the
    # reference code's implicit reward; off by default, see README "Self-play" for how far it is from the scoring
    # pass's (TRL's) numbers
    reuse_logps: bool = False
    model: ModelConfig | None = None  # the generator; None: the policy's path, dtype and actors, on vLLM


# The Evol-Instruct rewrites (mapray/generation/evolve.py holds their prompt templates)
EvolveStrategy = Literal["breadth", "deepen", "constraints", "concretize", "reasoning"]


@dataclass(frozen=True)
class EvolveConfig:
    """`mapray evolve`: which prompts of a finished self-play output are rewritten, and how."""

    top_fraction: float = 0.25  # of the prompts, by their mean MAP (the reference code's)
    strategies: list[EvolveStrategy] = field(
        default_factory=lambda: ["breadth", "deepen", "constraints", "concretize", "reasoning"])
    temperature: float = 0.8  # one rewrite per prompt and strategy
    max_tokens: int = 1024
    max_growth: float = 5.0  # a rewrite longer than this many times its original (characters) is set aside


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
    generation: GenerationConfig | None = None  # `mapray selfplay` / `evolve`; None: GenerationConfig()'s defaults
    evolve: EvolveConfig | None = None  # `mapray evolve`; None: EvolveConfig()'s defaults


MAX_CONFIG_BYTES = 16 << 20  # a run config is a few KiB; anything this large is the wrong file
_REPR = reprlib.Repr()  # values quoted in messages: bounded depth, length and items
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Reads a YAML file (or starts from `base`), applies `key.sub=value` overrides, validates. Every problem
    with the file or an override is a `ConfigError` naming the key, never another exception."""
    data: dict = copy.deepcopy(base) if base else {}  # an override must not write into the caller's dict
    if path is not None:
        loaded = _parse_yaml(_read_config(path), f"config {_show(path)}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {_show(path)} must be a mapping of sections, got {type(loaded).__name__}")
        data.update(loaded)
    for item in overrides:
        _apply_override(data, item)
    cfg = from_dict(RunConfig, data, "")
    return validate(cfg)


def _read_config(path: str) -> bytes:
    try:
        with open(path, "rb") as f:  # bytes: the YAML reader decodes them and reports bad UTF-8 as YAML errors
            text = f.read(MAX_CONFIG_BYTES + 1)  # bounded: `--config /dev/zero` must not read forever
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read config {_show(path)}: {getattr(e, 'strerror', None) or e}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {_show(path)} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a run config")
    return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no `!!python/...` tag is ever constructed, let alone run) that also refuses a key
    given twice in one mapping: plain YAML keeps the last silently, so a second `policy:` section would replace
    the first without a word. A merge (`<<: *base`) may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: the base class reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_short(key)}",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str | bytes, what: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: safe_load plus the duplicate check
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{what} is not valid YAML: {_first_line(e.problem or e.context or e)}{at}") from None
    # ValueError: a timestamp such as 2020-13-45, an int beyond Python's digit limit; RecursionError: deep nesting
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
        raise ConfigError(f"{what} is not valid YAML: {_first_line(e) or type(e).__name__}") from None


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {_short(item)}: expected key.sub=value")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {_show(key)}: empty key segment, expected key.sub=value")
    node = data
    *parents, leaf = parts
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {_show(key)}: {_show(part)} is not a section")
        node = child
    node[leaf] = _parse_yaml(raw, f"--set {_show(key)}: the value") if raw else ""


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass `cls` from plain data, checking keys and types; `where` names the key in errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in known), key=str)  # YAML keys may be ints, None, ...
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])} (known: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(tp, value, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(type(value) is type(a) and value == a for a in allowed):  # True is not 1, 1.0 is not "1"
            raise ConfigError(f"{where}: {_short(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        return _text_mapping(value, where)
    if tp is float and type(value) is int:
        _check_scalar(value, where)
        value = float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {_short(value)}")
    _check_scalar(value, where)
    return value


def _coerce_union(tp: Any, value: Any, where: str) -> Any:
    options = [o for o in typing.get_args(tp) if o is not type(None)]
    if value is None and len(options) < len(typing.get_args(tp)):
        return None
    errors = {}
    for option in options:
        try:
            return _coerce(option, value, where)
        except ConfigError as e:
            errors[option] = str(e)
    # the option of the value's own shape tells what is wrong inside it: "input.uri[1]: expected str, got int 2"
    shaped = [msg for option, msg in errors.items() if isinstance(value, typing.get_origin(option) or option)]
    if len(errors) == 1 or len(shaped) == 1:
        raise ConfigError(shaped[0] if shaped else next(iter(errors.values())))
    names = " or ".join(str(o) if typing.get_origin(o) else o.__name__ for o in options)
    raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {_short(value)}")


def _text_mapping(value: Any, where: str) -> dict[str, str]:
    """A `dict[str, str]` field (environment variables): text keys, scalar values kept as their text."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    for k, v in value.items():
        if type(k) is not str:
            raise ConfigError(f"{where}: keys must be text, got {type(k).__name__} {_short(k)}")
        if type(v) not in (str, int, float):  # not bool: `true` would arrive as the text "True"
            raise ConfigError(f"{_join(where, k)}: expected text or a number, got {type(v).__name__} {_short(v)}")
        _check_scalar(k, where)
        _check_scalar(v, _join(where, k))
    return {k: str(v) for k, v in value.items()}


def _check_scalar(value: Any, where: str) -> None:
    """Values of a field's type that no run can use: NaN or infinite floats, ints beyond 64 bits, and text that
    is not valid Unicode (a YAML "\\ud800" escape gives a lone surrogate, which no path or log can hold)."""
    if type(value) is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if type(value) is int and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where}: {_short(value)} is out of range")
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where}: not valid Unicode text: {_short(value)}") from None


def _join(where: str, name: Any) -> str:
    return f"{where}.{_show(name)}" if where else _show(name)


def _show(name: Any) -> str:
    """A key or path for a one-line message: as written when it is short printable text, else a short repr."""
    return name if isinstance(name, str) and name.isprintable() and len(name) <= 200 else _short(name)


def _short(value: Any) -> str:
    """A bounded, one-line repr: a YAML alias can make a value exponentially large when written out in full."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int too long for Python to write out
        return f"<{type(value).__name__}>"



def _first_line(e: Any) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else ""


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
    if cfg.metric.alpha < 0:  # mapray select refuses it too: a negative weight rewards implicit margins
        raise ConfigError(f"metric.alpha: must be >= 0, got {cfg.metric.alpha}")
    if cfg.metric.beta is not None and cfg.metric.beta <= 0:
        raise ConfigError(f"metric.beta: must be > 0, got {cfg.metric.beta}")
    if cfg.reference is not None and not cfg.reference.path:
        raise ConfigError("reference.path is required when a reference section is given")
    if cfg.reward.source == "model" and (cfg.reward.model is None or not cfg.reward.model.path):
        raise ConfigError("reward.source=model needs reward.model.path")
    validate_selection(cfg.selection)
    _validate_counts(cfg)
    _validate_generation(cfg.generation or GenerationConfig(), cfg.evolve or EvolveConfig())
    for name, model in configured_models(cfg):
        _validate_model(name, model)
    return cfg


def validate_selection(sel: SelectionConfig, key: typing.Callable[[str], str] = lambda n: f"selection.{n}") -> None:
    """The selection checks, shared by a run config and `mapray select` (whose `key` names its flags)."""
    given = [n for n in ("ratio", "top_k", "threshold") if getattr(sel, n) is not None]
    if len(given) > 1:
        a, b = given[:2]
        raise ConfigError(f"{key(a)}={getattr(sel, a)} and {key(b)}={getattr(sel, b)}: set only one of ratio, "
                          "top_k, threshold (a null value clears one)")
    if sel.ratio is not None and not 0.0 <= sel.ratio <= 1.0:  # NaN fails too
        raise ConfigError(f"{key('ratio')}: must be in [0, 1], got {sel.ratio}")
    if sel.top_k is not None and sel.top_k < 0:
        raise ConfigError(f"{key('top_k')}: must be >= 0, got {sel.top_k}")
    if sel.threshold is not None and not math.isfinite(sel.threshold):
        raise ConfigError(f"{key('threshold')}: must be a finite number, got {sel.threshold}")


def configured_models(cfg: RunConfig) -> list[tuple[str, ModelConfig]]:
    models = [("policy", cfg.policy)]
    if cfg.reference is not None:
        models.append(("reference", cfg.reference))
    if cfg.reward.source == "model" and cfg.reward.model is not None:
        models.append(("reward.model", cfg.reward.model))
    return models


def _validate_counts(cfg: RunConfig) -> None:
    """Counts that would otherwise fail inside Ray (`ds.limit(-1)`) or read nothing."""
    counts = {"input.limit": cfg.input.limit, "input.schema_sample_rows": cfg.input.schema_sample_rows,
              "input.max_row_chars": cfg.input.max_row_chars, "ray.num_cpus": cfg.ray.num_cpus}
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")


def _validate_generation(g: GenerationConfig, e: EvolveConfig) -> None:
    if g.n < 2:  # a pair needs two samples
        raise ConfigError(f"generation.n: must be >= 2, got {g.n}")
    if g.temperature < 0 or e.temperature < 0:
        key, value = ("generation", g.temperature) if g.temperature < 0 else ("evolve", e.temperature)
        raise ConfigError(f"{key}.temperature: must be >= 0, got {value}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p: must be in (0, 1], got {g.top_p}")
    for key, value in (("generation.max_tokens", g.max_tokens), ("evolve.max_tokens", e.max_tokens)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if not 0 < e.top_fraction <= 1:
        raise ConfigError(f"evolve.top_fraction: must be in (0, 1], got {e.top_fraction}")
    if e.max_growth <= 0:
        raise ConfigError(f"evolve.max_growth: must be > 0, got {e.max_growth}")
    if not e.strategies or len(set(e.strategies)) < len(e.strategies):
        raise ConfigError(f"evolve.strategies: must be a non-empty list without repeats, got {e.strategies}")
    if g.model is not None:
        _validate_model("generation.model", g.model)


def generator_config(cfg: RunConfig) -> ModelConfig:
    """The model that samples: `generation.model`, else the policy's checkpoint and settings on vLLM (the only
    engine mapray samples with)."""
    model = (cfg.generation.model if cfg.generation and cfg.generation.model else cfg.policy)
    return dataclasses.replace(model, engine="vllm")


def _validate_model(name: str, m: ModelConfig) -> None:
    positive = {"max_length": m.max_length, "token_budget": m.token_budget, "batch_size": m.batch_size,
                "actors": m.actors, "lm_head_chunk": m.lm_head_chunk,
                "tensor_parallel_size": m.tensor_parallel_size, "max_num_batched_tokens": m.max_num_batched_tokens}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}.{key}: must be >= 1, got {value}")
    if m.token_budget < m.max_length:
        raise ConfigError(f"{name}.token_budget ({m.token_budget}) must be >= max_length ({m.max_length})")
    for key in ("cpus_per_actor", "gpus_per_actor"):
        if getattr(m, key) < 0:
            raise ConfigError(f"{name}.{key}: must be >= 0, got {getattr(m, key)}")
    if not 0 < m.gpu_memory_utilization <= 1:
        raise ConfigError(f"{name}.gpu_memory_utilization: must be in (0, 1], got {m.gpu_memory_utilization}")
    if m.tree_attention == "flex" and m.engine != "torch":
        raise ConfigError(f"{name}.tree_attention: flex is a torch-engine setting (engine is {m.engine})")


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
