"""Checks a run's models against its config from their files, before Ray starts.

A model that cannot serve its role (too few positions for `max_length`, no chat template for conversational
rows, a reward head with more than one label, a policy that is not a causal LM) or a device that is not there
would otherwise fail inside a Ray actor, after Ray started and the models were hashed, as a long traceback.
Here the same facts are read from the checkpoint's small files (config.json, tokenizer_config.json,
chat_template.jinja; through fsspec, so a remote checkpoint's weights are never copied for it) and a problem
stops the run with one line naming the key. The engines keep their own checks as a second line of defence.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import fsspec

from mapray.config import ModelConfig, RunConfig, configured_models
from mapray.errors import ConfigError, first_line
from mapray.models import resolve_model_path

# the heads AutoModelForCausalLM loads (multimodal models name theirs *ForConditionalGeneration); anything else,
# a *ForSequenceClassification or a bare *Model, would get a freshly initialised LM head: log-probs from noise
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
REWARD_SUFFIX = "ForSequenceClassification"


@dataclass(frozen=True)
class ModelFiles:
    """What a checkpoint's small files say; `where` names it in messages."""

    where: str
    config: dict
    tokenizer_config: dict
    template_file: str  # chat_template.jinja beside tokenizer_config.json ("" if absent)


def check_models(cfg: RunConfig, needs_chat_template: bool) -> None:
    """Every configured model against its config keys; `needs_chat_template`: the input format renders rows
    through a chat template (conversational rows), for every model that reads them."""
    for key, model in configured_models(cfg):
        files = read_model_files(model.path, f"{key}.path")
        if key.startswith("reward."):
            check_reward_head(key, model, files)
        else:
            check_causal_lm(key, files)
        check_positions(key, model, files)
        check_tree_attention(key, model, files)
        if needs_chat_template:
            check_chat_template(key, model, files)
    check_devices(cfg)


def read_model_files(path: str, key: str) -> ModelFiles:
    """The small files of the checkpoint at `path` (messages name it as configured)."""
    local = path
    if path.startswith("pkg:") or path.endswith(".gguf"):
        # converted into the local cache here rather than after Ray starts: the driver hashes that checkpoint
        # next anyway, and its config.json is exactly what the actors load
        try:
            local = resolve_model_path(path)
        except Exception as e:  # a corrupt file, gguf not installed: one line, not a traceback
            raise ConfigError(f"{key}: cannot convert {path} into a checkpoint: {first_line(e)}") from None
    fs, root = fsspec.core.url_to_fs(local)
    root = root.rstrip("/")
    config = _read_json(fs, f"{root}/config.json", key)
    if config is None:
        raise ConfigError(f"{key}: {path} is not a model checkpoint (no config.json)")
    template = _read(fs, f"{root}/chat_template.jinja", key)
    return ModelFiles(path, config, _read_json(fs, f"{root}/tokenizer_config.json", key) or {},
                      template.decode("utf-8", "replace") if template else "")


def check_causal_lm(key: str, files: ModelFiles) -> None:
    archs = _architectures(files)
    if archs and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs):
        raise ConfigError(f"{key}.path: {files.where} is a {archs[0]} checkpoint, not a causal LM "
                          f"(*ForCausalLM): its log-probs would come from an untrained LM head")


def check_reward_head(key: str, model, files: ModelFiles) -> None:
    """A *ForSequenceClassification: a single-label head's logit is the reward; a head of several labels needs
    one weight per label (`label_weights`), which reduce its scores to the reward."""
    archs = _architectures(files)
    if archs and not any(a.endswith(REWARD_SUFFIX) for a in archs):
        raise ConfigError(f"{key}.path: {files.where} is a {archs[0]} checkpoint; a reward model must be a "
                          f"*{REWARD_SUFFIX}")
    labels, source = _num_labels(files.config)
    weights = getattr(model, "label_weights", None)
    if weights is None and labels != 1:
        names = label_names(files.config)
        raise ConfigError(f"{key}.path: {files.where} has {labels} labels ({source}); a reward model has one, or "
                          f"set {key}.label_weights: one weight per label{f' ({names})' if names else ''}")
    if weights is not None and len(weights) != labels:
        raise ConfigError(f"{key}.label_weights: {len(weights)} weights for the {labels} labels of {files.where} "
                          f"({source})")


def label_names(config: dict) -> str:
    """The head's labels in order, as its config.json names them ("" when it names none)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict):
        return ""
    try:
        return ", ".join(str(id2label[k]) for k in sorted(id2label, key=int))
    except ValueError:
        return ""


def check_positions(key: str, model: ModelConfig, files: ModelFiles, generated_token: bool | None = None) -> None:
    """Beyond its positions a model scores garbage (RoPE) or crashes. `generated_token`: one position is kept
    for a token generated after the scored sequence (default: the vLLM scoring engine's prompt log-probs ask for
    one; a sampler's context is max_length itself). The engines check it again where they load (a second line)."""
    positions = _positions(files.config)
    extra = model.engine == "vllm" if generated_token is None else generated_token
    if positions is not None and model.max_length + extra > positions:
        kept = f"; the vLLM engine keeps one for a generated token: at most {positions - 1}" if extra else ""
        raise ConfigError(f"{key}.max_length: {model.max_length} exceeds the {positions} positions of "
                          f"{files.where} (max_position_embeddings in its config.json{kept})")


def check_tree_attention(key: str, model: ModelConfig, files: ModelFiles) -> None:
    """`tree_attention: flex` switches the model to FlexAttention, which transformers offers per model class."""
    if model.tree_attention != "flex":
        return
    import transformers

    for arch in _architectures(files)[:1]:
        cls = getattr(transformers, arch, None)
        if cls is not None and not getattr(cls, "_supports_flex_attn", False):
            raise ConfigError(f"{key}.tree_attention: flex, but {arch} ({files.where}) cannot run on FlexAttention "
                              f"in transformers {transformers.__version__}; use tree_attention: mask")


def check_chat_template(key: str, model: ModelConfig, files: ModelFiles) -> None:
    if model.chat_template is not None:  # the config's template replaces the tokenizer's, even when empty
        if not model.chat_template.strip():
            raise ConfigError(f"{key}.chat_template: is empty; conversational rows need a chat template")
        return
    if files.tokenizer_config.get("chat_template") or files.template_file.strip():
        return
    raise ConfigError(f"{key}.chat_template: {files.where} has no chat template (none in tokenizer_config.json "
                      f"or chat_template.jinja) and conversational rows need one; set {key}.chat_template")


def check_devices(cfg: RunConfig) -> None:
    """GPUs asked for against the GPUs there are, where they can be counted from here (see `_available_gpus`)."""
    wanted = [(key, model) for key, model in configured_models(cfg) if _gpus_asked(model)[0] or model.device == "cuda"]
    available = _available_gpus(cfg) if wanted else None
    if available is None:
        return
    asked = 0.0
    for key, model in wanted:
        gpus, field = _gpus_asked(model)
        if available == 0:
            what, field = ("cuda", "device") if model.device == "cuda" else (f"{gpus:g} GPUs", field)
            raise ConfigError(f"{key}.{field}: {what} asked, but this machine has no CUDA device (the run would "
                              "start a local Ray here); use device: cpu with gpus_per_actor: 0, or set ray.address")
        asked += gpus
        if asked > available:
            raise ConfigError(f"{key}.{field}: the model stages' actors ask for {asked:g} GPUs but this machine "
                              f"has {available}; lower actors or {field}")


def _gpus_asked(model: ModelConfig) -> tuple[float, str]:
    """GPUs a model's actor pool holds, and the key that asks for them."""
    if model.engine == "vllm" and model.tensor_parallel_size > 1:  # one GPU bundle per shard, per actor
        return float(model.actors * model.tensor_parallel_size), "tensor_parallel_size"
    return model.actors * model.gpus_per_actor, "gpus_per_actor"


def _available_gpus(cfg: RunConfig) -> int | None:
    """This machine's GPUs when the run will start an embedded local Ray on it (as `pipeline.init_ray` does
    without an address); None otherwise: a cluster's driver (the head node) often has no GPU while its workers
    do, and a Ray joined earlier in this process may be such a cluster (or one that scales GPU nodes up later)."""
    ray = sys.modules.get("ray")
    if (ray is not None and ray.is_initialized()) or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    import torch  # only when a GPU is asked for: a second or two, before Ray's start-up

    return torch.cuda.device_count()


def _architectures(files: ModelFiles) -> list[str]:
    archs = files.config.get("architectures")
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def _num_labels(config: dict) -> tuple[int, str]:
    """As transformers counts them: id2label's length, else num_labels, else its default of 2."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"]), "id2label in its config.json"
    if isinstance(config.get("num_labels"), int):
        return config["num_labels"], "num_labels in its config.json"
    return 2, "transformers' default: its config.json has no id2label or num_labels"


def _positions(config: dict) -> int | None:
    for section in (config, config.get("text_config")):
        value = section.get("max_position_embeddings") if isinstance(section, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _read_json(fs, path: str, key: str) -> dict | None:
    raw = _read(fs, path, key)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ConfigError(f"{key}: {path} is not valid JSON: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} is not a JSON object")
    return data


def _read(fs, path: str, key: str) -> bytes | None:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except Exception as e:  # credentials, an unreachable host: one line, not a traceback
        raise ConfigError(f"{key}: cannot read {path}: {first_line(e)}") from None

