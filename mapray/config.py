"""mapray's configuration: one frozen dataclass per section, checked alike from YAML, `--set` or Python.

`load_config` reads a run's YAML (`mapray.typed_config` does the typing); the same classes are built directly
in Python for the API (`mapray.api`). Every key is checked against its declared type and its section's rules
before anything runs, so a typo or a wrong value stops with one line naming the key (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Literal

from mapray.errors import ConfigError
from mapray.typed_config import Checked, Key, load, to_dict

__all__ = ["ColumnNames", "ConfigError", "DiffConfig", "EvolveConfig", "GenerationConfig", "InputConfig",
           "MetricConfig", "ModelConfig", "RayConfig", "RewardConfig", "RewardModelConfig", "RunConfig",
           "SelectionConfig", "configured_models", "generator_config", "load_config", "reward_models", "to_dict"]


def _at_least(key: Key, values: dict[str, int | float | None], low: float) -> None:
    for name, value in values.items():
        if value is not None and value < low:
            raise ConfigError(f"{key(name)}: must be >= {low:g}, got {value}")


@dataclass(frozen=True)
class ColumnNames(Checked):
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
class InputConfig(Checked):
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

    def check(self, key: Key) -> None:
        # counts that would otherwise fail inside Ray (`ds.limit(-1)`) or read nothing
        _at_least(key, {"limit": self.limit, "schema_sample_rows": self.schema_sample_rows,
                        "max_row_chars": self.max_row_chars}, 1)


@dataclass(frozen=True)
class ModelConfig(Checked):
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
    token_budget: int = 16384  # padded tokens per forward pass (torch engine); at least max_length
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

    def check(self, key: Key) -> None:
        _at_least(key, {"max_length": self.max_length, "token_budget": self.token_budget,
                        "batch_size": self.batch_size, "actors": self.actors, "lm_head_chunk": self.lm_head_chunk,
                        "tensor_parallel_size": self.tensor_parallel_size,
                        "max_num_batched_tokens": self.max_num_batched_tokens}, 1)
        _at_least(key, {"cpus_per_actor": self.cpus_per_actor, "gpus_per_actor": self.gpus_per_actor}, 0)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{key('gpu_memory_utilization')}: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tree_attention == "flex" and self.engine != "torch":
            raise ConfigError(f"{key('tree_attention')}: flex is a torch-engine setting (engine is {self.engine})")

    def check_in_run(self, key: Key) -> None:
        """What a model of a run needs besides its own fields' rules (kept out of `check`, where it would name
        whichever of the two keys the other's default disagrees with)."""
        if not self.path:
            raise ConfigError(f"{key('path')} is required")
        if self.token_budget < self.max_length:
            raise ConfigError(f"{key('token_budget')} ({self.token_budget}) must be >= max_length "
                              f"({self.max_length})")


# a model's settings that say how its pass runs, not what it computes: its values come out the same either way
# (up to floating-point order), as the score cache takes them (`mapray.cache.namespace` keys on none of them), so
# a run resumes across a change of them (`computed_settings`): after running out of memory with a smaller
# batch_size, or on a cluster with more actors. Not gpus_per_actor: with device auto it moves the model between
# CPU and GPU, whose values differ by more than that.
RUN_ONLY_MODEL_SETTINGS = ("token_budget", "lm_head_chunk", "prefix_sharing", "packing", "tree_attention",
                           "batch_size", "actors", "cpus_per_actor", "tensor_parallel_size", "max_num_batched_tokens",
                           "gpu_memory_utilization")


def computed_settings(model: dict | None) -> dict | None:
    """A model's settings (as `to_dict` gives them) as far as they decide its values: what the keys of resumable
    passes hash (a run's staging, the samples of self-play, an evolve round)."""
    if model is None:
        return None
    return {k: v for k, v in model.items() if k not in RUN_ONLY_MODEL_SETTINGS}


@dataclass(frozen=True)
class RewardModelConfig(ModelConfig):
    """A reward model: where and how it runs (`ModelConfig`), and how its scores make the run's reward."""

    # names its columns in a run of several models (reward_<name>_chosen, ...); None: from the path's last part
    name: str | None = None
    weight: float = 1.0  # its weight in the combination of several models (`reward.combine`)
    # a multi-objective head (several labels): reward = sum of weight x label score, one weight per label in the
    # checkpoint's id2label order (checked against its config.json before Ray starts); None: a single-label head
    label_weights: list[float] | None = None

    def check(self, key: Key) -> None:
        super().check(key)
        if self.name is not None and not re.fullmatch(NAME_PATTERN, self.name):
            raise ConfigError(f"{key('name')}: {self.name!r} must match {NAME_PATTERN} (it names columns)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"{key('weight')}: must be a finite number > 0, got {self.weight}")
        if self.label_weights is not None and (not self.label_weights
                                               or not all(math.isfinite(w) for w in self.label_weights)):
            raise ConfigError(f"{key('label_weights')}: must be a non-empty list of finite numbers, "
                              f"got {self.label_weights}")

    @property
    def column_name(self) -> str:
        """The name its columns carry: `name`, else the path's last part made a column-safe name."""
        if self.name:
            return self.name
        stem = re.sub(r"\.gguf$", "", self.path.rstrip("/").rsplit("/", 1)[-1])
        return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "model"


NAME_PATTERN = r"[a-z][a-z0-9_]*"
# how several reward models' margins make the explicit margin (`mapray.ensemble`); `mapray select --combine`
# offers these (typing.get_args)
CombineRule = Literal["mean", "mean_z"]


@dataclass(frozen=True)
class RewardConfig(Checked):
    source: Literal["columns", "model"] = "columns"  # columns: scores from the input; model: reward model(s)
    model: RewardModelConfig | None = None  # one reward model: its margin is the explicit margin
    # several reward models, each its own actor pool and cache namespace; the explicit margin combines theirs
    models: list[RewardModelConfig] = field(default_factory=list)
    # how several models' margins make the explicit margin (`mapray.ensemble`): mean: the weighted mean of the
    # raw margins; mean_z: the weighted mean of each model's margin z-scored over the pool (models on different
    # scales count alike)
    combine: CombineRule = "mean"
    # a pair whose models' margins differ in sign: keep it (its `reward_sign_disagree` says so), or set it aside
    # (rejects/, code reward_disagreement) before the selection
    on_sign_disagreement: Literal["keep", "set_aside"] = "keep"

    def check(self, key: Key) -> None:
        if self.model is not None and self.models:
            raise ConfigError(f"{key('model')} and {key('models')}: set one (a list of one model is allowed)")
        if self.source == "model" and not self.models and (self.model is None or not self.model.path):
            raise ConfigError(f"{key('source')}=model needs {key('model')}.path (or {key('models')})")
        names = [m.column_name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{key('models')}: two models are named {repeated[0]!r}; give each a distinct name")

    @property
    def several(self) -> bool:
        """A run of `models` (per-model columns and a combination), not of the one `model`."""
        return self.source == "model" and bool(self.models)


@dataclass(frozen=True)
class MetricConfig(Checked):
    implicit: Literal["simpo", "dpo"] = "simpo"
    beta: float | None = None  # None: 2.0 for simpo (SimPO's beta), 0.1 for dpo
    alpha: float = 1.0  # weight of the implicit term in MAP (reference code default)

    def check(self, key: Key) -> None:
        check_alpha(self.alpha, key("alpha"))
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"{key('beta')}: must be > 0, got {self.beta}")

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 2.0 if self.implicit == "simpo" else 0.1

    @property
    def needs_reference_model(self) -> bool:
        return self.implicit == "dpo"


def check_alpha(alpha: float, key: str) -> None:
    """A negative weight would reward implicit margins; `mapray select --alpha` is checked by the same rule."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(f"{key}: must be a finite number >= 0, got {alpha}")


# The one list of selection metric names: `mapray select --metric` offers these (typing.get_args), and
# metrics.selection_score ranks by the column of that name, by one computed from the two margins
# (metrics.FROM_MARGINS: the literature's rules, formulas and sources in metrics' docstring), or randomly.
SelectionMetric = Literal["map_z", "map", "map_unreg", "explicit_margin", "implicit_margin_small", "random",
                          "implicit_margin_large", "dpo_loss", "dpo_grad_weight", "rm_confidence",
                          "rank_disagreement"]
DEFAULT_RATIO = 0.4  # the reference code's default
RULES = ("ratio", "top_k", "threshold")


@dataclass(frozen=True)
class SelectionConfig(Checked):
    """Which rows to keep: set at most one of ratio, top_k, threshold; none set keeps ratio DEFAULT_RATIO."""

    metric: SelectionMetric = "map_z"
    ratio: float | None = None  # keep the top fraction of the scored pool, floor(ratio * n) rows
    top_k: int | None = None  # keep the top k rows
    threshold: float | None = None  # keep every row whose selection score exceeds it (the paper's MAP > tau)
    seed: int = 0  # for metric "random"
    # per-group selection (README "Keeping a mixture"): the rule applies within each group of rows with the same
    # value in this column of the scored rows (rows with none form the group "null"), not over the whole pool
    by: str | None = None
    # with `by`: a group's own rule, by its value as text: an int keeps that many of its rows (top_k), a float in
    # [0, 1] that share of them (ratio); a group not named takes the rule above
    quotas: dict[str, int | float] = field(default_factory=dict)
    # with `by`: the pool whose moments z-score map_z: "pool" (default) or "group". The margins' scale is the
    # models' (a reward model's spread does not change with a row's source), and a small group's own moments are
    # noisy: its quota already guarantees its share, so z-scores over the pool rank within a group by the same
    # yardstick as everywhere; "group" ranks each group by its own spread (a mixture whose groups were scored by
    # reward models of different scales)
    zscore: Literal["pool", "group"] = "pool"

    def check(self, key: Key) -> None:
        given = [n for n in RULES if getattr(self, n) is not None]
        if len(given) > 1:
            a, b = given[:2]
            raise ConfigError(f"{key(a)}={getattr(self, a)} and {key(b)}={getattr(self, b)}: set only one of ratio, "
                              "top_k, threshold (a null value clears one)")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:  # NaN fails too
            raise ConfigError(f"{key('ratio')}: must be in [0, 1], got {self.ratio}")
        _at_least(key, {"top_k": self.top_k}, 0)
        if self.by is None:
            for name, unset in (("quotas", {}), ("zscore", "pool")):
                if getattr(self, name) != unset:
                    raise ConfigError(f"{key(name)} applies to groups: set {key('by')} to the column that names "
                                      "them")
        for group, quota in self.quotas.items():
            where = f"{key('quotas')}.{group}"
            if type(quota) is int and quota < 0:
                raise ConfigError(f"{where}: a count of rows must be >= 0, got {quota}")
            if type(quota) is float and not 0.0 <= quota <= 1.0:
                raise ConfigError(f"{where}: a share of the group must be in [0, 1], got {quota} (an int is a "
                                  "count of rows)")

    @property
    def rule(self) -> tuple[str, float]:
        """(name, value) of the rule in force: the one set, else ratio DEFAULT_RATIO."""
        for name in RULES:
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return "ratio", DEFAULT_RATIO

    def group_rule(self, group: str) -> tuple[str, float]:
        """(name, value) of the rule of the group whose value reads `group` as text: its quota, else `rule`."""
        quota = self.quotas.get(group)
        if quota is None:
            return self.rule
        return ("top_k", quota) if type(quota) is int else ("ratio", quota)


@dataclass(frozen=True)
class GenerationConfig(Checked):
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

    def check(self, key: Key) -> None:
        _at_least(key, {"n": self.n}, 2)  # a pair needs two samples
        _at_least(key, {"temperature": self.temperature}, 0)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{key('top_p')}: must be in (0, 1], got {self.top_p}")
        _at_least(key, {"max_tokens": self.max_tokens}, 1)


# The Evol-Instruct rewrites (mapray/generation/rewrites.py holds their prompt templates)
EvolveStrategy = Literal["breadth", "deepen", "constraints", "concretize", "reasoning"]


@dataclass(frozen=True)
class EvolveConfig(Checked):
    """`mapray evolve`: which prompts of a finished self-play output are rewritten, and how."""

    top_fraction: float = 0.25  # of the prompts, by their mean MAP (the reference code's)
    strategies: list[EvolveStrategy] = field(
        default_factory=lambda: ["breadth", "deepen", "constraints", "concretize", "reasoning"])
    temperature: float = 0.8  # one rewrite per prompt and strategy
    max_tokens: int = 1024
    max_growth: float = 5.0  # a rewrite longer than this many times its original (characters) is set aside

    def check(self, key: Key) -> None:
        _at_least(key, {"temperature": self.temperature}, 0)
        _at_least(key, {"max_tokens": self.max_tokens}, 1)
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"{key('top_fraction')}: must be in (0, 1], got {self.top_fraction}")
        if self.max_growth <= 0:
            raise ConfigError(f"{key('max_growth')}: must be > 0, got {self.max_growth}")
        if not self.strategies or len(set(self.strategies)) < len(self.strategies):
            raise ConfigError(f"{key('strategies')}: must be a non-empty list without repeats, got {self.strategies}")


@dataclass(frozen=True)
class DiffConfig(Checked):
    """A run's diff against the previous run (`mapray.changes`): written as diff.json and diff/ beside the results;
    a churn above `max_churn` leaves the results unpublished and fails the run."""

    previous: str | None = None  # the previous run's output URI; None: this run's output as it was last published
    max_churn: float | None = None  # the largest share of the selection that may change; None: no bound
    tolerance: float = 1e-6  # a margin moved when it changed by more than this times max(1, |old value|)

    def check(self, key: Key) -> None:
        if self.max_churn is not None and not 0.0 <= self.max_churn <= 1.0:
            raise ConfigError(f"{key('max_churn')}: must be in [0, 1], got {self.max_churn}")
        _at_least(key, {"tolerance": self.tolerance}, 0)


@dataclass(frozen=True)
class RayConfig(Checked):
    address: str | None = None  # None: connect to RAY_ADDRESS if set, else start an embedded local Ray
    num_cpus: int | None = None  # embedded Ray only
    # every worker's: a local Ray inherits them from the driver's environment, a cluster's job gets a runtime_env
    env_vars: dict[str, str] = field(default_factory=dict)

    def check(self, key: Key) -> None:
        _at_least(key, {"num_cpus": self.num_cpus}, 1)


@dataclass(frozen=True)
class RunConfig(Checked):
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
    diff: DiffConfig | None = None  # compare the selection with the previous run's before publishing (nightly)
    # the model pass's actors. None (the default): one actor pool runs every model of the run when each is a torch
    # model asking no GPU and all ask the same number of actors (on CPUs one process then imports torch and
    # transformers once, not once per model); True: one pool for every model all the same (GPU asks add up);
    # False: a pool per model
    colocate_models: bool | None = None

    def check(self, key: Key) -> None:
        """Between sections. A policy is not required here (a config may be built step by step in Python); the
        scorer and the file runs require it (`check_scoring`)."""
        if self.metric.needs_reference_model and self.reference is None:
            raise ConfigError(f"{key('metric')}.implicit=dpo needs a reference model: set {key('reference')}.path")
        for name, model in configured_models(self):
            if name != "policy" or model.path:
                model.check_in_run(lambda n, name=name: f"{key(name)}.{n}")
        if self.colocate_models:
            reason = colocation_blocker(self, needs_cpu=False)
            if reason:
                raise ConfigError(f"{key('colocate_models')}: {reason}")


def check_scoring(cfg: RunConfig) -> RunConfig:
    """What scoring needs on top of a valid config: a policy (the implicit margin is its log-probs)."""
    cfg.policy.check_in_run(lambda n: f"policy.{n}")
    return cfg


def load_config(path: str | None, overrides: typing.Sequence[str] = (), base: dict | None = None) -> RunConfig:
    """A file run's config: YAML (or `base`) with `key.sub=value` overrides; input, output and policy given."""
    cfg = load(RunConfig, path, overrides, base)
    if not cfg.input.uri:
        raise ConfigError("input.uri is required")
    if not cfg.output:
        raise ConfigError("output is required (an output URI)")
    return check_scoring(cfg)


def configured_models(cfg: RunConfig) -> list[tuple[str, ModelConfig]]:
    models = [("policy", cfg.policy)]
    if cfg.reference is not None:
        models.append(("reference", cfg.reference))
    models.extend((key, model) for key, _, model in reward_models(cfg))
    return models


def colocates_models(cfg: RunConfig) -> bool:
    """Whether the model pass runs every model of `cfg` in one actor pool (`RunConfig.colocate_models`)."""
    if cfg.colocate_models is not None:
        return cfg.colocate_models
    return len(configured_models(cfg)) > 1 and colocation_blocker(cfg, needs_cpu=True) is None


def colocation_blocker(cfg: RunConfig, needs_cpu: bool) -> str | None:
    """Why the models of `cfg` cannot share one actor pool (None: they can). vLLM engines keep their own actors:
    each binds the process's threads (CPU) or takes a fraction of a GPU's memory for itself."""
    models = configured_models(cfg)
    for key, model in models:
        if model.engine != "torch":
            return f"{key}.engine is {model.engine}: only torch-engine models share an actor"
        if needs_cpu and model.gpus_per_actor:
            return f"{key}.gpus_per_actor is {model.gpus_per_actor:g}"
    if len({model.actors for _, model in models}) > 1:
        return "the models ask different numbers of actors (" + ", ".join(
            f"{key}.actors={model.actors}" for key, model in models) + ")"
    return None


def reward_models(cfg: RunConfig) -> list[tuple[str, str | None, RewardModelConfig]]:
    """(config key, column name, model) of each reward model; the column name is None for the one `reward.model`
    (its columns are reward_chosen / reward_rejected)."""
    if cfg.reward.source != "model":
        return []
    if cfg.reward.models:
        return [(f"reward.models[{i}]", m.column_name, m) for i, m in enumerate(cfg.reward.models)]
    return [("reward.model", None, cfg.reward.model)] if cfg.reward.model is not None else []


def generator_config(cfg: RunConfig) -> ModelConfig:
    """The model that samples: `generation.model`, else the policy's checkpoint and settings on vLLM (the only
    engine mapray samples with)."""
    model = (cfg.generation.model if cfg.generation and cfg.generation.model else cfg.policy)
    return dataclasses.replace(model, engine="vllm", tree_attention="mask")
