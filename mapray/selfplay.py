"""Self-play, in the order it runs:

1. prompts (any input mapray reads) -> one prompt row each, staged;
2. N samples per prompt from the policy on a vLLM actor pool (`mapray.generation`), under Ray Data's
   checkpoint keyed by row, published as <output>/generated/ (Parquet, N-candidates rows) + generated.json;
3. the scoring pipeline over generated/: the reward model scores every sample, the best and the worst make the
   pair, policy log-probs (or the generation's own, `generation.reuse_logps`), MAP, global selection ->
   scored/, selected/, rejects/, manifest.json (with the generation's numbers and the lineage).
`evolve` makes round k+1 from round k's output: its prompts by mean MAP, the top fraction rewritten with the
Evol-Instruct strategies by the same policy, the rewrites filtered, then steps 1-3 on them.

A rerun of the same command resumes: the sampling is keyed by the input files, the generation settings and the
generator's content, so finished prompts are not sampled again, and a rerun that changes only the scoring (a new
reward model, another alpha) reuses generated/ as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import fsspec
import pyarrow as pa

from mapray import columns as C
from mapray.config import (
    ColumnNames,
    ConfigError,
    EvolveConfig,
    GenerationConfig,
    InputConfig,
    RunConfig,
    configured_models,
    generator_config,
    to_dict,
)
from mapray.generation import evolve as E
from mapray.generation.prompts import LINEAGE, PromptReader, prompt_format
from mapray.generation.stage import GenerateStage
from mapray.inputs import InputFiles, discover, read_dataset, read_staged, sample_records
from mapray.models import check_model_path, identify_model
from mapray.outputs import OutputLayout, read_manifest
from mapray.pipeline import score, staging_key
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
from mapray.uris import move_folder

log = logging.getLogger(__name__)

GENERATED, EVOLVED = "generated", "evolved"
# a generated/ row is scored as an N-candidates row: its id is the prompt's, and a prompt that could not be sampled
# is set aside with the reason generation recorded
GENERATED_COLUMNS = ColumnNames(id="prompt_id", error="generation_error")


def selfplay(cfg: RunConfig) -> dict:
    """Prompts in cfg.input -> generated/, scored/, selected/, rejects/, manifest.json under cfg.output."""
    check(cfg)
    return play_round(cfg, {"round": 0})


def play_round(cfg: RunConfig, lineage: dict) -> dict:
    """Sampling, then scoring and selection, of a config `check` has passed."""
    return score(scoring_config(cfg), extra={"generation": generate(cfg), "lineage": lineage})


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
    # the sampler's context is max_length itself (the +1 of check_positions is the vLLM scoring engine's)
    check_positions(key, dataclasses.replace(generator, engine="torch"), files)
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
    if not layout.is_done("prompts"):
        layout.remove(layout.staged("prompts"))
        read_dataset(files, cfg.input.limit, num_cpus=LIGHT_TASK_CPUS) \
            .map_batches(PromptReader(fmt, cfg.input.columns), batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS) \
            .write_parquet(layout.staged("prompts"))
        layout.mark_done("prompts")
    before = checkpointed_rows(layout.staged("checkpoint"))
    sampling_at = time.time()
    if not layout.is_done(GENERATED):
        sample_prompts(layout, generator, sampling)
        layout.mark_done(GENERATED)
    # a crash while publishing may have moved the folder already: it is complete either way
    written = layout.staged(GENERATED) if layout.exists(layout.staged(GENERATED)) else layout.final(GENERATED)
    info = {"key": key, "format": fmt, "generator": {"configured": generator.path, **identity},
            "sampling": to_dict(sampling), **generation_counts(written),
            "sampled_this_attempt": checkpointed_rows(layout.staged("checkpoint")) - before,
            "timings": {"generation_s": round(time.time() - sampling_at, 3),
                        "total_s": round(time.time() - started, 3)}}
    publish_folder(layout, GENERATED, info)
    return info


def sample_prompts(layout: OutputLayout, generator, sampling: GenerationConfig, n: int | None = None) -> None:
    """The staged prompts -> staged generated rows, on the generator's actor pool, resumable by row."""
    with checkpointed(layout.staged("checkpoint"), C.ROW) as unwritten, watched():
        prompts = unwritten(read_staged(layout.staged("prompts"), num_cpus=LIGHT_TASK_CPUS))
        map_stage(prompts, GenerateStage, generator, sampling=sampling, n=n) \
            .write_parquet(layout.staged(GENERATED), ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})


def generation_key(cfg: RunConfig, files: InputFiles, sampling: GenerationConfig, generator, sha: str) -> str:
    """What the samples depend on: the input files (name, size, time), how prompts are read, the sampling
    settings, the generator's content and settings. Not the reward model, the metric or the selection."""
    drawn = {k: v for k, v in to_dict(sampling).items() if k not in ("reuse_logps", "model")}  # scoring's, generator's
    return staging_key("gen", {"input": to_dict(cfg.input), "files": files.listing(), "sampling": drawn,
                               "generator": {**to_dict(generator), "path": None}, "sha": sha})


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


def publish_folder(layout: OutputLayout, name: str, info: dict) -> None:
    """Moves staged folder `name` to <output>/<name>/ and writes <output>/<name>.json last (what readers wait
    for). The output's manifest goes first: scored/ no longer matches the new samples until it is rewritten."""
    fs, root = layout.fs, layout.root
    for path in (f"{root}/manifest.json", f"{root}/{name}.json"):
        if fs.exists(path):
            fs.rm(path)
    final, staged = f"{root}/{name}", fsspec.core.url_to_fs(layout.staged(name))[1]
    if fs.exists(staged):  # else moved already by an attempt that crashed before the marker
        if fs.exists(final):
            fs.rm(final, recursive=True)
        move_folder(fs, staged, final)
    with fs.open(f"{root}/{name}.json", "w") as f:
        json.dump(info, f, indent=2, default=str)
    fs.rm(f"{root}/_staging/{layout.run_id}", recursive=True)


def read_generation(output: str, name: str = GENERATED) -> dict | None:
    try:
        with fsspec.open(f"{output.rstrip('/')}/{name}.json") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def scoring_config(cfg: RunConfig) -> RunConfig:
    """The run config that scores generated/: N-candidates rows, keyed by prompt, read whole."""
    layout = OutputLayout(cfg.output)
    source = InputConfig(uri=layout.final(GENERATED), format="candidates", file_format="parquet",
                         columns=GENERATED_COLUMNS)
    return dataclasses.replace(cfg, input=source)


# --- evolve: round k+1 from round k ---

def evolve(cfg: RunConfig, source: str) -> dict:
    """Rewrites the best prompts of the self-play output at `source` and runs self-play on the rewrites into
    cfg.output; the manifest's `lineage` links the rounds."""
    check(cfg)
    previous = read_manifest(source)
    if "generation" not in previous:
        raise ConfigError(f"evolve: {source} is not a `mapray selfplay` output (its manifest has no generation)")
    if OutputLayout(source).uri == OutputLayout(cfg.output).uri:
        raise ConfigError("output: evolve writes a new round; give it another output than the one it reads")
    settings = cfg.evolve or EvolveConfig()
    round_ = previous.get("lineage", {}).get("round", 0) + 1
    rewrites = evolve_prompts(cfg, source, previous["run_id"], settings, round_)
    lineage = {"round": round_, "parent": {"output": OutputLayout(source).uri, "run_id": previous["run_id"]},
               "evolve": {**to_dict(settings), **{k: v for k, v in rewrites.items() if k != "key"}},
               "history": [previous.get("lineage", {"round": 0})]}
    evolved = OutputLayout(cfg.output).final(EVOLVED)
    round_input = InputConfig(uri=evolved, format="prompts", file_format="parquet",
                              columns=ColumnNames(error="evolve_error"))
    return play_round(dataclasses.replace(cfg, input=round_input), lineage)


def evolve_prompts(cfg: RunConfig, source: str, source_run: str, settings: EvolveConfig, round_: int) -> dict:
    """<output>/evolved/: one row per (top prompt, strategy) with the rewrite as its prompt, or the reason it is
    set aside in `evolve_error`."""
    import ray.data

    generator = generator_config(cfg)
    init_ray(cfg.ray, [generator])
    scored = OutputLayout(source).final("scored")
    sha = identify_model(generator.path)["sha256"]
    key = staging_key("evolve", {"source": source_run, "settings": to_dict(settings), "sha": sha,
                                 "seed": (cfg.generation or GenerationConfig()).seed,
                                 "reward": to_dict(cfg.reward.model)})
    current = read_generation(cfg.output, EVOLVED)
    if current is not None and current["key"] == key:
        return current
    layout = OutputLayout(cfg.output, run_id=key)
    ranked = ray.data.read_parquet(scored, columns=["prompt_id", "prompt", "map"]) \
        .groupby("prompt_id").map_groups(_mean_map, batch_format="pyarrow").materialize()  # counted, then sorted
    total = ranked.count()
    if not total:
        raise ConfigError(f"evolve: {source} has no scored prompt to rewrite")
    top = max(1, math.ceil(settings.top_fraction * total))
    best = ranked.sort(["map", "prompt_id"], descending=[True, False]).limit(top)
    if not layout.is_done("prompts"):
        layout.remove(layout.staged("prompts"))
        best.map_batches(_rewrite_requests, fn_kwargs={"settings": settings, "round_": round_},
                         batch_format="pyarrow").write_parquet(layout.staged("prompts"))
        layout.mark_done("prompts")
    rewriting = GenerationConfig(n=1, temperature=settings.temperature, top_p=1.0,
                                 max_tokens=settings.max_tokens, seed=(cfg.generation or GenerationConfig()).seed)
    if not layout.is_done(GENERATED):
        sample_prompts(layout, generator, rewriting, n=1)
        layout.mark_done(GENERATED)
    layout.remove(layout.staged(EVOLVED))
    read_staged(layout.staged(GENERATED), num_cpus=LIGHT_TASK_CPUS).map_batches(
        RewriteFilter, fn_constructor_kwargs={"reward": cfg.reward.model, "settings": settings},
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=LIGHT_TASK_CPUS) \
        .write_parquet(layout.staged(EVOLVED))
    errors = ray.data.read_parquet(layout.staged(EVOLVED), columns=["evolve_error"]).to_pandas()["evolve_error"]
    info = {"key": key, "prompts_ranked": total, "prompts_rewritten": top, "rewrites": len(errors),
            "rewrites_kept": int(errors.isna().sum()), "rewrites_set_aside": int(errors.notna().sum())}
    publish_folder(layout, EVOLVED, info)
    return info


def _mean_map(group: pa.Table) -> pa.Table:
    """One prompt's rows -> one row: its id, its messages, the mean MAP of its pairs."""
    import pyarrow.compute as pc

    return pa.table({"prompt_id": group.column("prompt_id").slice(0, 1),
                     "prompt": group.column("prompt").slice(0, 1),
                     "map": pa.array([pc.mean(group.column("map")).as_py()], pa.float64())})


def _rewrite_requests(table: pa.Table, settings: EvolveConfig, round_: int) -> pa.Table:
    """Each top prompt x strategy -> a prompt row (`mapray.generation.prompts.SCHEMA`) asking for the rewrite."""
    import uuid

    from mapray.generation.prompts import SCHEMA

    rows = []
    for pid, messages in zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()):
        original = E.last_user_text(messages)
        for strategy in settings.strategies:
            rows.append({"prompt_id": f"{pid}:{strategy}", "prompt": E.rewrite_request(original, strategy,
                                                                                       settings.max_growth),
                         "input_raw": original, "evolved_from": pid, "evolve_strategy": strategy,
                         "evolve_round": round_, C.ROW: uuid.uuid4().hex})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class RewriteFilter:
    """Generated rewrites -> evolved/ prompt rows: the rewrite, its lineage, and why it is set aside (if so)."""

    SCHEMA = pa.schema([("prompt", pa.string()), ("original", pa.string()), *LINEAGE.items(),
                        ("evolve_error", pa.string()), ("rewrite_raw", pa.string())])

    def __init__(self, reward, settings: EvolveConfig):
        from mapray.stages import load_encoder

        self.encoder, _ = load_encoder(reward)  # the rewrite must fit the context of the model that scores it
        self.context, self.settings = reward.max_length, settings

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for row in table.to_pylist():
            raw = (row["all_generated_responses"] or [None])[0]
            text = E.clean_rewrite(raw or "")
            error = row["generation_error"]
            if error is None:
                tokens = len(self.encoder.encode_prompt([{"role": "user", "content": text}])) if text else 0
                finished = (row["finish_reasons"] or ["stop"])[0] == "stop"
                error = E.rewrite_problem(row["input_raw"], text, self.settings.max_growth, tokens, self.context,
                                          finished)
            rows.append({"prompt": text if error is None else None, "original": row["input_raw"],
                         **{k: row[k] for k in LINEAGE}, "evolve_error": error, "rewrite_raw": raw})
        return pa.Table.from_pylist(rows, schema=self.SCHEMA)
