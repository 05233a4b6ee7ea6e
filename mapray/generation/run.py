"""The self-play round, in the order it runs:

1. prompts (any input mapray reads) -> one prompt row each, staged;
2. N samples per prompt from the policy on a vLLM actor pool (`mapray.generation`), under Ray Data's
   checkpoint keyed by row, published as <output>/generated/ (Parquet, N-candidates rows) + generated.json;
3. the scoring pipeline over generated/: the reward model scores every sample, the best and the worst make the
   pair, policy log-probs (or the generation's own, `generation.reuse_logps`), MAP, global selection ->
   scored/, selected/, rejects/, manifest.json (with the generation's numbers and the lineage).
`mapray.generation.evolve` makes round k+1 from round k's output: its prompts by mean MAP, the top fraction
rewritten with the Evol-Instruct strategies by the same policy, the rewrites filtered, then steps 1-3 on them.

A rerun of the same command resumes: the sampling is keyed by the input files, the generation settings and the
generator's content, so finished prompts are not sampled again, and a rerun that changes only the scoring (a new
reward model, another alpha) reuses generated/ as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import fsspec

from mapray.config import (
    ColumnNames,
    GenerationConfig,
    InputConfig,
    RunConfig,
    computed_settings,
    configured_models,
    generator_config,
)
from mapray.console import stage
from mapray.errors import ConfigError
from mapray.generation.prompts import ROW_ID, PromptReader, prompt_format
from mapray.generation.stage import GenerateStage, unsampled
from mapray.inputs import InputFiles, discover, read_dataset, read_staged, sample_records
from mapray.models import check_model_path, identify_model
from mapray.outputs import OutputLayout, read_json
from mapray.pipeline import score, staged_dataset, staging_key
from mapray.preflight import check_causal_lm, check_chat_template, check_models, check_positions, read_model_files
from mapray.runtime import (
    LIGHT_TASK_CPUS,
    check_local_cpus,
    checkpointed,
    checkpointed_rows,
    init_ray,
    map_stage,
    watched,
)
from mapray.typed_config import to_dict

log = logging.getLogger(__name__)

GENERATED = "generated"
# a generated/ row is scored as an N-candidates row: its id is the prompt's, and a prompt that could not be sampled
# is set aside with the reason generation recorded
GENERATED_COLUMNS = ColumnNames(id="prompt_id", error="generation_error")


def selfplay(cfg: RunConfig) -> dict:
    """Prompts in cfg.input -> generated/, scored/, selected/, rejects/, manifest.json under cfg.output."""
    check(cfg)
    return play_round(cfg, {"round": 0})


def play_round(cfg: RunConfig, lineage: dict) -> dict:
    """Sampling, then scoring and selection, of a config `check` has passed. The manifest records the config as
    given (its input: the prompts) and, as `scored_input`, the generated/ rows the scoring pass read."""
    scoring = scoring_config(cfg)
    return score(scoring, extra={"generation": generate(cfg), "lineage": lineage, "config": to_dict(cfg),
                                 "scored_input": to_dict(scoring.input)})


def check(cfg: RunConfig) -> None:
    """The self-play settings no scoring run checks, before Ray starts or a model loads."""
    if cfg.reward.source != "model":
        raise ConfigError("reward.source: self-play needs a reward model to score the samples (reward.source=model)")
    sampling = cfg.generation or GenerationConfig()
    generator = generator_config(cfg)
    if sampling.reuse_logps and (generator.path != cfg.policy.path or generator.chat_template
                                 != cfg.policy.chat_template):
        raise ConfigError("generation.reuse_logps: the generation's log-probs are the policy's only when the "
                          "generator is the policy (same path and chat template)")
    if sampling.reuse_logps and cfg.metric.implicit == "dpo":
        log.info("generation.reuse_logps: the policy's log-probs come from the generation; the reference still "
                 "scores the pair")
    for key, model in configured_models(cfg):
        check_model_path(model.path, f"{key}.path")
    key = "generation.model" if cfg.generation and cfg.generation.model else "policy"
    check_model_path(generator.path, f"{key}.path")
    # what the model files say against the config, for the scoring pass (generated rows are conversational) and
    # for the sampler, before hours of sampling rather than after
    check_models(cfg, needs_chat_template=True)
    files = read_model_files(generator.path, f"{key}.path")
    check_causal_lm(key, files)
    check_positions(key, generator, files, generated_token=False)  # the sampler's context is max_length itself
    check_chat_template(key, generator, files)
    if not cfg.ray.address and not os.environ.get("RAY_ADDRESS"):  # the two passes, each on the embedded Ray
        cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        check_local_cpus(cpus, [generator])
        check_local_cpus(cpus, [m for _, m in configured_models(cfg)])


def generate(cfg: RunConfig) -> dict:
    """Samples every prompt of cfg.input (unless generated/ is current) and returns what generated.json holds."""
    started = time.time()
    sampling, generator = cfg.generation or GenerationConfig(), generator_config(cfg)
    files = discover(cfg.input)
    fmt = prompt_format(cfg.input.format, sample_records(files, cfg.input.schema_sample_rows), cfg.input.columns)
    OutputLayout(cfg.output).check_writable()
    identity = identify_model(generator.path)
    key = generation_key(cfg, files, sampling, generator, identity["sha256"])
    layout = OutputLayout(cfg.output, run_id=key)
    current = read_generation(cfg.output)
    if current is not None and current["key"] == key:
        log.info("%s is current (same prompts, settings and generator): not sampled again", layout.final(GENERATED))
        return current
    init_ray(cfg.ray, [generator])
    with stage("prompts"):
        layout.stage("prompts", lambda path: read_dataset(files, cfg.input.limit, num_cpus=LIGHT_TASK_CPUS)
                     .map_batches(PromptReader(fmt, cfg.input.columns), batch_format="pyarrow",
                                  num_cpus=LIGHT_TASK_CPUS).write_parquet(path))
    before = checkpointed_rows(layout.staged("checkpoint"))
    sampling_at = time.time()
    # every prompt set aside already (bad lines, an evolve round whose rewrites all failed): no sampler to start
    prompts = staged_dataset(layout.staged("prompts"))  # listed once for both
    sampler = GenerateStage if any_prompt_to_sample(prompts) else None
    with stage("sampling", total=prompts.count_rows() - before):
        layout.stage(GENERATED, lambda path: sample_prompts(layout, generator, sampler, sampling=sampling),
                     resumable=True)
    # a crash while publishing may have moved the folder already: it is complete either way
    written = layout.staged(GENERATED) if layout.exists(layout.staged(GENERATED)) else layout.final(GENERATED)
    info = {"key": key, "format": fmt, "generator": {"configured": generator.path, **identity},
            "sampling": to_dict(sampling), **generation_counts(written),
            "sampled_this_attempt": checkpointed_rows(layout.staged("checkpoint")) - before,
            "timings": {"generation_s": round(time.time() - sampling_at, 3),
                        "total_s": round(time.time() - started, 3)}}
    layout.publish_folder(GENERATED, info)
    return info


def sample_prompts(layout: OutputLayout, generator, stage=GenerateStage, **stage_kwargs) -> None:
    """The staged prompts -> staged generated rows, on the generator's actor pool, resumable by row. `stage` is the
    actor class (`GenerateStage(cfg, **stage_kwargs)`, or one that does more with its samples); its rows keep
    ROW_ID, the checkpoint's key. `stage` None: no prompt is to be sampled, and the rows get no samples in light
    tasks (`unsampled`), with no actor and no model."""
    with checkpointed(layout.staged("checkpoint"), ROW_ID) as unwritten, watched():
        prompts = unwritten(read_staged(layout.staged("prompts"), num_cpus=LIGHT_TASK_CPUS))
        rows = map_stage(prompts, stage, generator, **stage_kwargs) if stage is not None else prompts.map_batches(
            unsampled, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
        rows.write_parquet(layout.staged(GENERATED), ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})


def any_prompt_to_sample(prompts) -> bool:
    """Whether a staged prompt (`prompts`: the staged prompts' `staged_dataset`) is left that no step has set
    aside: the driver reads one column until it finds one (the first, in a pool of good prompts)."""
    import pyarrow.compute as pc

    error = pc.field("generation_error")
    if prompts.head(1, columns=["generation_error"], filter=error.is_null()).num_rows:
        return True
    log.info("every prompt was set aside before sampling: no sampler starts")
    return False


def generation_key(cfg: RunConfig, files: InputFiles, sampling: GenerationConfig, generator, sha: str) -> str:
    """What the samples depend on: the input files (name, size, time), how prompts are read, the sampling
    settings, the generator's content and the settings that decide its values (`computed_settings`: a sampling
    killed for memory resumes with a smaller batch_size). Not the reward model, the metric or the selection."""
    drawn = {k: v for k, v in to_dict(sampling).items() if k not in ("reuse_logps", "model")}  # scoring's, generator's
    return staging_key("gen", {"input": to_dict(cfg.input), "files": files.listing(), "sampling": drawn,
                               "generator": computed_settings({**to_dict(generator), "path": None}), "sha": sha})


def generation_counts(uri: str) -> dict:
    """Prompts, prompts set aside (by reason), samples and generated tokens of a generated/ folder: two narrow
    columns, read on the driver."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    fs, path = fsspec.core.url_to_fs(uri)
    table = pds.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["generation_error", "generation_tokens"])
    errors, tokens = table.column("generation_error"), pc.list_flatten(table.column("generation_tokens"))
    reasons: dict[str, int] = {}
    for reason in errors.drop_null().to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"prompts": len(errors), "set_aside": len(errors) - errors.null_count, "samples": len(tokens),
            "generated_tokens": int(pc.sum(tokens).as_py() or 0), "set_aside_by_reason": reasons}


def read_generation(output: str, name: str = GENERATED) -> dict | None:
    return read_json(f"{output.rstrip('/')}/{name}.json")


def scoring_config(cfg: RunConfig) -> RunConfig:
    """The run config that scores generated/: N-candidates rows, keyed by prompt, read whole."""
    layout = OutputLayout(cfg.output)
    source = InputConfig(uri=layout.final(GENERATED), format="candidates", file_format="parquet",
                         columns=GENERATED_COLUMNS)
    return dataclasses.replace(cfg, input=source)
