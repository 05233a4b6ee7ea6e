"""The evolve round: round k+1 of self-play from round k's output.

The prompts of round k ranked by their mean MAP (a Ray Data group-by over its scored/), the top fraction
rewritten with each Evol-Instruct strategy by the policy (`mapray.generation.rewrites`: the templates and the
filters), one rewrite each, sampled and filtered in the sampler's actors; the rewrites that pass are round k+1's
prompts (<output>/evolved/, every rewrite kept with its original, strategy and the reason it was set aside), and
the self-play round (`mapray.generation.run`) samples, scores and selects them. The manifest's `lineage` links
the rounds.
"""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from mapray import columns as C
from mapray.config import (
    ColumnNames,
    EvolveConfig,
    GenerationConfig,
    InputConfig,
    RunConfig,
    computed_settings,
    generator_config,
    reward_models,
)
from mapray.console import stage
from mapray.errors import ConfigError
from mapray.generation import rewrites as R
from mapray.generation.prompts import LINEAGE, ROW_ID
from mapray.generation.run import GENERATED, check, play_round, read_generation, sample_prompts
from mapray.generation.stage import GenerateStage
from mapray.inputs import read_staged
from mapray.models import identify_model
from mapray.outputs import OutputLayout, read_manifest
from mapray.pipeline import staging_key
from mapray.runtime import LIGHT_TASK_CPUS, checkpointed_rows, init_ray
from mapray.typed_config import to_dict

EVOLVED = "evolved"


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
                                 "reward": [computed_settings(to_dict(m)) for _, _, m in reward_models(cfg)]})
    current = read_generation(cfg.output, EVOLVED)
    if current is not None and current["key"] == key:
        return current
    layout = OutputLayout(cfg.output, run_id=key)
    with stage("ranking prompts"):
        ranked = ray.data.read_parquet(scored).select_columns(["prompt_id", "prompt", C.MAP]) \
            .groupby("prompt_id").map_groups(_mean_map, batch_format="pyarrow").materialize()  # counted, sorted
        total = ranked.count()
        if not total:
            raise ConfigError(f"evolve: {source} has no scored prompt to rewrite")
        top = max(1, math.ceil(settings.top_fraction * total))
        best = ranked.sort([C.MAP, "prompt_id"], descending=[True, False]).limit(top)
        requests = best.map_batches(_rewrite_requests, fn_kwargs={"settings": settings, "round_": round_},
                                    batch_format="pyarrow")
        layout.stage("prompts", requests.write_parquet)
    # one rewrite per request: `n=1` goes to the sampler, not into a GenerationConfig (whose n, samples to pair,
    # is at least 2)
    rewriting = GenerationConfig(temperature=settings.temperature, top_p=1.0, max_tokens=settings.max_tokens,
                                 seed=(cfg.generation or GenerationConfig()).seed)
    rewards = [m for _, _, m in reward_models(cfg)]
    with stage("rewriting", total=top * len(settings.strategies) - checkpointed_rows(layout.staged("checkpoint"))):
        layout.stage(GENERATED, lambda path: sample_prompts(layout, generator, RewriteStage, sampling=rewriting,
                                                            rewards=rewards, settings=settings), resumable=True)
    evolved = layout.stage(EVOLVED, read_staged(layout.staged(GENERATED), num_cpus=LIGHT_TASK_CPUS)
                           .drop_columns([ROW_ID]).write_parquet)
    errors = ray.data.read_parquet(evolved).select_columns(["evolve_error"]).to_pandas()["evolve_error"]
    info = {"key": key, "prompts_ranked": total, "prompts_rewritten": top, "rewrites": len(errors),
            "rewrites_kept": int(errors.isna().sum()), "rewrites_set_aside": int(errors.notna().sum())}
    layout.publish_folder(EVOLVED, info)
    return info


def _mean_map(group: pa.Table) -> pa.Table:
    """One prompt's rows -> one row: its id, its messages, the mean MAP of its pairs."""
    import pyarrow.compute as pc

    return pa.table({"prompt_id": group.column("prompt_id").slice(0, 1),
                     "prompt": group.column("prompt").slice(0, 1),
                     C.MAP: pa.array([pc.mean(group.column(C.MAP)).as_py()], pa.float64())})


def _rewrite_requests(table: pa.Table, settings: EvolveConfig, round_: int) -> pa.Table:
    """Each top prompt x strategy -> a prompt row (`mapray.generation.prompts.SCHEMA`) asking for the rewrite."""
    import uuid

    from mapray.generation.prompts import ROW_ID, SCHEMA

    rows = []
    for pid, messages in zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()):
        original = R.last_user_text(messages)
        for strategy in settings.strategies:
            rows.append({"prompt_id": f"{pid}:{strategy}", "prompt": R.rewrite_request(original, strategy,
                                                                                       settings.max_growth),
                         "input_raw": original, "evolved_from": pid, "evolve_strategy": strategy,
                         "evolve_round": round_, ROW_ID: uuid.uuid4().hex})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class RewriteStage:
    """Rewrite requests -> evolved/ rows, in the sampler's actor: each request's one rewrite (`GenerateStage`,
    n=1), then `RewriteFilter` on it. The filter's tokenizers load beside the sampler rather than in an actor
    process of their own (importing transformers: 8 s of the tiny round's 59 here). Each row keeps its request's
    ROW_ID, by which the checkpoint resumes a killed round."""

    def __init__(self, cfg, sampling: GenerationConfig, rewards: list, settings: EvolveConfig):
        self.sample = GenerateStage(cfg, sampling, n=1)
        self.filter = RewriteFilter(rewards, settings)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.filter(self.sample(table)).append_column(ROW_ID, table.column(ROW_ID))


class RewriteFilter:
    """Generated rewrites -> evolved/ prompt rows: the rewrite, its lineage, and why it is set aside (if so)."""

    SCHEMA = pa.schema([("prompt", pa.string()), ("original", pa.string()), *LINEAGE.items(),
                        ("evolve_error", pa.string()), ("rewrite_raw", pa.string())])

    def __init__(self, rewards: list, settings: EvolveConfig):
        from mapray.stages import load_encoder

        # the rewrite must fit the context of every reward model that scores it
        self.encoders = [(load_encoder(reward)[0], reward.max_length) for reward in rewards]
        self.settings = settings

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for row in table.to_pylist():
            raw = (row["all_generated_responses"] or [None])[0]
            text = R.clean_rewrite(raw or "")
            error = row["generation_error"]
            finished = (row["finish_reasons"] or ["stop"])[0] == "stop"
            for encoder, context in self.encoders if error is None else ():
                tokens = len(encoder.encode_prompt([{"role": "user", "content": text}])) if text else 0
                error = R.rewrite_problem(row["input_raw"], text, self.settings.max_growth, tokens, context, finished)
                if error is not None:
                    break
            rows.append({"prompt": text if error is None else None, "original": row["input_raw"],
                         **{k: row[k] for k in LINEAGE}, "evolve_error": error, "rewrite_raw": raw})
        return pa.Table.from_pylist(rows, schema=self.SCHEMA)
