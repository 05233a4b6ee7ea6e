"""The scoring run, top to bottom: read -> the API's steps (`mapray.api.Scorer`, `mapray.selection`) -> publish.

plan (config, input files, the models' files and identities, before Ray starts) -> normalized rows (staged) ->
cached scores attached (staged, when a cache has some) -> the model pass: rewards, policy, reference, row metrics,
public rows (staged, resumable by row under Ray Data's checkpoint) -> what it computed stored in the cache ->
the global pass: the selection decision over the staged pool -> scored/, selected/, rejects/ -> README.md
(dataset card) -> manifest.json. `reselect` is the global pass again over a published scored/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from functools import partial

import fsspec
import pyarrow as pa

from mapray import __version__
from mapray import columns as C
from mapray.api import InputShape, Scorer
from mapray.cache import Namespace, namespace, write_generations
from mapray.cache_lookup import attach_hits
from mapray.changes import against_previous
from mapray.config import (
    ConfigError,
    RayConfig,
    RewardConfig,
    RunConfig,
    SelectionConfig,
    colocates_models,
    computed_settings,
    configured_models,
    reward_models,
    to_dict,
)
from mapray.console import stage
from mapray.duplicates import set_aside
from mapray.ensemble import Combination, combined_margins
from mapray.groups import check_group_column, check_group_values
from mapray.inputs import InputFiles, discover, read_dataset, read_staged, sample_records
from mapray.manifest import build_manifest, identify_models
from mapray.normalize import infer_own_schema
from mapray.outputs import OutputLayout, read_manifest, write_results
from mapray.public_rows import public_rows
from mapray.runtime import LIGHT_TASK_CPUS, checkpointed, checkpointed_rows, init_ray, watched
from mapray.selection import decide, mark
from mapray.stages import LogprobStage, RewardStage, reward_role
from mapray.typed_config import from_dict
from mapray.uris import absolute, reachable

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything checked and decided before Ray starts or a model loads."""

    cfg: RunConfig
    scorer: Scorer
    files: InputFiles
    shape: InputShape
    layout: OutputLayout
    models: dict  # each configured model's identity (`mapray.manifest.identify_models`)


def plan(cfg: RunConfig) -> Plan:
    scorer = Scorer(cfg)
    files = discover(cfg.input)
    OutputLayout(cfg.output).check_writable()
    if cfg.cache:
        reachable(cfg.cache, "cache")
    sample = sample_records(files, cfg.input.schema_sample_rows)
    check_group_values(sample, cfg.selection.by)
    shape = scorer.shape(sample, source=files.uris[0])
    if files.file_format == "jsonl":  # the own columns' types, from the sample rows this spec would score
        shape = replace(shape, spec=replace(shape.spec, own_schema=infer_own_schema(sample, shape.spec)))
    models = identify_models(cfg)  # remembered: a rerun with unchanged checkpoints reads no weights
    layout = OutputLayout(cfg.output, run_id=run_key(cfg, files, models))
    return Plan(cfg, scorer, files, shape, layout, models)


def run_key(cfg: RunConfig, files: InputFiles, models: dict) -> str:
    """Names the staging folder: the same config over the same input files (by name, size and modification
    time) and the same model contents resumes there; any change, a checkpoint rewritten in place included,
    starts a fresh run, but for the settings that say how the run runs rather than what it computes
    (`computed_config`)."""
    shas = {key: model["sha256"] for key, model in models.items()}
    return staging_key("run", {"config": computed_config(cfg), "files": files.listing(), "models": shas})


def computed_config(cfg: RunConfig) -> dict:
    """The config as far as it decides the run's values: without where Ray runs and on how many CPUs (its
    workers' environment stays in), the models' colocation, the diff (it reads the staged results only) and each
    model's `RUN_ONLY_MODEL_SETTINGS` (batch sizes, actors, the engines' budgets and strategies). A run killed
    for memory resumes with a smaller batch_size."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("diff", "colocate_models")}
    config["ray"] = {"env_vars": config["ray"]["env_vars"]}
    for key in ("policy", "reference"):
        config[key] = computed_settings(config[key])
    reward = config["reward"]
    reward["model"], reward["models"] = computed_settings(reward["model"]), [computed_settings(m)
                                                                             for m in reward["models"]]
    if config["generation"] is not None:
        config["generation"]["model"] = computed_settings(config["generation"]["model"])
    return config


def staging_key(kind: str, payload: dict) -> str:
    """`<kind>-<hash>` of what a staged pass depends on (with mapray's version): the name of its staging folder."""
    text = json.dumps({**payload, "mapray": __version__}, sort_keys=True, default=str)
    return f"{kind}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_namespaces(cfg: RunConfig, models: dict) -> dict[str, tuple[Namespace, str | None]]:
    """Each model stage's cache namespace, with the `pick` its keys take (`mapray.cache.row_keys`); empty
    without a cache."""
    if not cfg.cache:
        return {}
    uri = absolute(cfg.cache)  # resolved here: an actor's working directory is not the driver's
    out = {}
    rewards = reward_models(cfg)
    for key, name, model in rewards:  # each reward model cached on its own: adding one scores only that one
        out[reward_role(name)] = (namespace(uri, reward_role(name), RewardStage.KIND, model,
                                            models[key]["sha256"]), None)
    pick = reward_pick(cfg, [out[reward_role(name)][0] for _, name, _ in rewards])
    if not (cfg.generation is not None and cfg.generation.reuse_logps):
        out["policy"] = (namespace(uri, "policy", LogprobStage.KIND, cfg.policy, models["policy"]["sha256"]), pick)
    if cfg.metric.needs_reference_model:
        out["reference"] = (namespace(uri, "reference", LogprobStage.KIND, cfg.reference,
                                      models["reference"]["sha256"]), pick)
    return out


def reward_pick(cfg: RunConfig, namespaces: list[Namespace]) -> str | None:
    """What picks candidates rows' pairs, for the keys of the log-prob stages' values (`mapray.cache.row_keys`):
    the reward models' namespaces, and their weights where those decide the pick (several models, label weights);
    None without a reward model."""
    rewards = reward_models(cfg)
    if not rewards:
        return None
    if len(rewards) == 1 and rewards[0][1] is None and rewards[0][2].label_weights is None:
        return namespaces[0].id  # the one single-label model: as before several models were possible
    return json.dumps([[ns.id, model.weight, model.label_weights] for ns, (_, _, model) in zip(namespaces, rewards)])


def score(cfg: RunConfig, extra: dict | None = None) -> dict:
    """Runs a full scoring job and returns its manifest (with `extra`'s keys added: what a calling loop such as
    self-play records). Rerunning the same command after a crash resumes it: the staging folder is keyed by the
    config, the input files and the models' contents, the normalize pass is redone only if it did not finish, and
    the scoring pass skips every row Ray Data's checkpoint says was already written."""
    started = time.time()
    p = plan(cfg)
    init_ray(cfg.ray, [m for _, m in configured_models(cfg)])
    layout = p.layout
    resumed = layout.exists(layout.staged("rows"))
    timings = {"start_s": time.time() - started}  # config checks, Ray start, model identities
    with stage("normalize"):
        layout.stage("normalized", lambda path: p.scorer.normalize(
            read_dataset(p.files, cfg.input.limit, num_cpus=LIGHT_TASK_CPUS), p.shape).write_parquet(path))
    timings["normalize_s"] = time.time() - started - timings["start_s"]
    # a column the format reads (prompt, chosen, ...) is the pair's, not the input's own: not carried as it was
    normalized = staged_dataset(layout.staged("normalized")).schema
    own = pa.schema([f for f in normalized if not (C.is_mapray_column(f.name) or f.name.startswith(C.INTERNAL_PREFIX))])
    check_group_column(own, cfg.selection.by, "selection.by", "the input's own columns")
    caches = cache_namespaces(cfg, p.models)
    with stage("cache lookup", quiet=not caches):
        model_input = look_up_cached(layout, caches)
        staged = staged_dataset(model_input)  # listed once: the counts below and the model pass's total
        from_cache = complete_namespaces(staged, caches)
        complete = from_cache | roles_without_rows(cfg, staged)
    timings["cache_lookup_s"] = time.time() - started - timings["start_s"] - timings["normalize_s"]
    done_before = checkpointed_rows(layout.staged("checkpoint"))
    model_pass_at = time.time()
    pool = staged.count_rows()
    with stage("model pass", total=pool - done_before):
        rows_path = layout.stage("rows", lambda path: model_pass(p, model_input, caches, complete, path),
                                 resumable=True)
    check_every_row_written(layout, pool, rows_path)
    scored_at = time.time()
    timings["model_pass_s"] = scored_at - model_pass_at  # model stages + row metrics + staged write
    import ray.data

    # one read of the staged rows for every pass below: Ray Data samples a read's files once, when it is made
    # (a task per sampled file, 1.5 s for a 200-file pool on 2 cores)
    rows = ray.data.read_parquet(rows_path)
    with stage("cache store", quiet=not caches):
        if caches and layout.has_parquet(rows_path):  # what this run computed: one generation per namespace
            write_generations(rows, [ns for ns, _ in caches.values()], layout.run_id)
    timings["cache_store_s"] = time.time() - scored_at
    scored_at = time.time()
    with stage("selection and outputs") as progress:
        combination = Combination.of(cfg.reward)
        # projected into the read; several reward models: their margins z-scored over the pool first
        narrow, combined = combined_margins(rows.select_columns(
            NARROW + group_columns(cfg.selection) + (combination.columns if combination else [])), combination)
        selection = decide(narrow, cfg.selection, cfg.metric.alpha, key=C.ROW, full=rows)
        counts = write_results(rows, partial(made_public, trl=p.shape.trl, selection=selection, combined=combined),
                               selection, layout)
        # the stage's rows are the pool's: its summary passes output a row per block, its write a file listing
        progress["rows"] = counts["input"]
    timings.update(global_pass_s=time.time() - scored_at, total_s=time.time() - started)
    manifest = build_manifest(cfg, p.models, counts, moments(selection), p.scorer.warnings,
                              {k: round(v, 3) for k, v in timings.items()}, layout.run_id, p.shape.format)
    manifest["resumed"], manifest["selection"] = resumed, selection.summary()
    manifest["from_cache_alone"] = sorted(from_cache)  # the models whose every value the cache held
    manifest["models_colocated"] = colocates_models(cfg)  # one actor pool ran every model (`colocate_models`)
    manifest["warnings"] = manifest["warnings"] + selection.warnings
    if combined is not None:
        manifest["reward_combination"] = combination.summary(combined[1])
    # rows the model pass wrote in this attempt, scored and set aside alike (a resumed run's earlier rows are not)
    manifest["counts"]["model_pass_rows_this_attempt"] = checkpointed_rows(layout.staged("checkpoint")) - done_before
    manifest.update(extra or {})
    changes = None
    if cfg.diff is not None:  # before publishing: a churn above the bound leaves the previous output in place
        with stage("diff against the previous run"):
            changes = against_previous(cfg, layout, manifest)
    layout.publish(manifest, changes)
    return manifest


def staged_dataset(path: str):
    """A staged Parquet folder as pyarrow sees it (its schema, its rows from the files' footers), read here on the
    driver: no Ray Data execution for what the footers say."""
    import pyarrow.dataset

    fs, local = fsspec.core.url_to_fs(path)
    return pyarrow.dataset.dataset(local, format="parquet", filesystem=fs)


def model_pass(p: Plan, model_input: str, caches: dict, complete: frozenset[str], path: str) -> None:
    """The staged rows -> the model stages -> scored internal rows at `path`, resumable by row: a rerun skips
    every row Ray Data's checkpoint records as written."""
    with checkpointed(p.layout.staged("checkpoint"), C.ROW) as unwritten, watched():
        normalized = unwritten(read_staged(model_input, num_cpus=LIGHT_TASK_CPUS))
        # light too: a write's default whole CPU would wait beside the model actors until the pass ends
        p.scorer.score(normalized, caches, complete).write_parquet(path,
                                                                   ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})


def check_every_row_written(layout, expected: int, rows_path: str) -> None:
    """Stops a run whose staged rows are fewer than the `expected` rows of its model input rather than publish a
    pool short of them: a checkpoint that records rows as written whose files are gone (a write's recovery that
    deleted them) would otherwise drop those pairs from every output without a word. Counted from the footers."""
    written = staged_dataset(rows_path).count_rows() if layout.has_parquet(rows_path) else 0
    if written != expected:
        raise ConfigError(f"the model pass staged {written} of {expected} rows at {rows_path} (its checkpoint "
                          f"records rows whose files are gone): remove {layout.staged('')[:-1]} and run again")


# what the selection's passes read of the staged rows (the rest only for the copies of a duplicated pair_id);
# `_m_reject` is where an internal row keeps its reason (`mapray.public_rows.reason_column`)
NARROW = [C.PAIR_ID, C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN, C.REJECT, C.ROW]


def group_columns(sel: SelectionConfig) -> list[str]:
    """The group column the selection's passes read besides NARROW (per-group selection)."""
    return [sel.by] if sel.by is not None else []


def made_public(table, trl, selection, combined=None):
    """A block of staged rows as the outputs hold it: duplicates set aside, the reward models' margins combined
    over the pool (`combined`: see `combined_margins`), public rows, the decision applied."""
    if selection.duplicates:
        table = set_aside(table, selection.duplicates, C.ROW)
    if combined is not None:
        table = combined[0].apply(table, combined[1])
    return mark(public_rows(table, trl), selection)


def remarked(table, selection, combined=None):
    """A block of scored/ with the decision of a reselection in place of the one it was published with."""
    if combined is not None:
        table = combined[0].apply(table, combined[1])
    return mark(table.drop_columns([c for c in C.SELECTION_COLUMNS if c in table.column_names]), selection)


def look_up_cached(layout: OutputLayout, caches: dict) -> str:
    """The staged rows the model pass reads: the normalized rows, with their cached values attached when any
    namespace has stored some (a pass of its own: see `mapray.cache`)."""
    stored = {ns.role: ns.stored_files() for ns, _ in caches.values()}
    lookups = [(ns, pick, stored[ns.role]) for ns, pick in caches.values() if stored[ns.role]]
    if not lookups:
        return layout.staged("normalized")

    def attach(path: str) -> None:

        normalized = read_staged(layout.staged("normalized"), num_cpus=LIGHT_TASK_CPUS)
        attach_hits(normalized, lookups, staged_dataset(layout.staged("normalized")).schema).write_parquet(path)

    return layout.stage("looked_up", attach)


def complete_namespaces(rows, caches: dict) -> frozenset[str]:
    """The roles whose cached values cover every row a model would score (the rows nothing set aside before the
    model pass): a nightly rescore where only the policy changed starts no actor for the others, and on a
    cluster holds no GPU for them. Counted from the staged rows' footers and two columns, on the driver (a
    filter, not the rows). A row a model sets aside itself (too long for it, ...) is never cached: its stage
    runs as usual to say why. `rows`: the staged model input (`staged_dataset`)."""
    import pyarrow.compute as pc

    if not caches:
        return frozenset()
    good = pc.field(C.REJECT).is_null()
    return frozenset(role for role, (ns, _) in caches.items() if ns.value_column in rows.schema.names
                     and rows.count_rows(filter=good & pc.field(ns.value_column).is_null()) == 0)


def roles_without_rows(cfg: RunConfig, rows) -> frozenset[str]:
    """Every model's role when no row reaches the model pass (each was set aside before it: an input of bad
    rows, an evolve round whose rewrites all failed): their stages run in light tasks as a complete cache's do,
    so no actor loads a model and no GPU is held to score nothing. The driver reads one column until it finds a
    row that reaches the pass (the first, in a pool of good rows). `rows`: the staged model input."""
    import pyarrow.compute as pc

    if rows.head(1, columns=[C.REJECT], filter=pc.field(C.REJECT).is_null()).num_rows:
        return frozenset()
    log.info("every row was set aside before the model pass: no model actor starts")
    return frozenset([reward_role(name) for _, name, _ in reward_models(cfg)] + ["policy", "reference"])


def moments(selection) -> dict:
    """The pool moments as the manifest records them."""
    pool = selection.pool
    return {C.EXPLICIT_MARGIN: pool.explicit.to_dict(), "abs_implicit_margin": pool.implicit_abs.to_dict()}


def reselect(uri: str, sel: SelectionConfig, alpha: float | None = None, combine: str | None = None) -> dict:
    """Selects again from an existing scored/ with another metric, ratio, alpha or (several reward models)
    combination rule; no model runs."""
    previous = read_manifest(uri)
    check_group_column(staged_dataset(f"{uri.rstrip('/')}/scored").schema, sel.by, "--by", "scored/")
    alpha = previous["config"]["metric"]["alpha"] if alpha is None else alpha
    reward = from_dict(RewardConfig, previous["config"]["reward"], "reward")
    combination = Combination.of(reward, combine)
    if combine is not None and combination is None:
        raise ConfigError(f"--combine: {uri} was scored with one reward model; a combination needs several")
    init_ray(RayConfig(), [])
    import ray.data

    layout = OutputLayout(uri)
    started = time.time()
    with stage("selection and outputs") as progress:
        scored = ray.data.read_parquet(layout.final("scored"))  # one read for both passes (files sampled once)
        narrow, combined = combined_margins(scored.select_columns(
            [C.PAIR_ID, C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN] + group_columns(sel)
            + (combination.columns if combination else [])), combination)
        selection = decide(narrow, sel, alpha)
        # the MAP forms and `selected` are computed again, with this alpha
        counts = write_results(scored, partial(remarked, selection=selection, combined=combined), selection, layout,
                               rejects=False)
        progress["rows"] = counts["scored"]
    counts.update(input=previous["counts"]["input"], rejected=previous["counts"]["rejected"],
                  rejected_by_code=previous["counts"].get("rejected_by_code", {}))
    config = dict(previous["config"], selection=to_dict(sel))
    config["metric"] = dict(config["metric"], alpha=alpha)
    if combined is not None:
        config["reward"] = dict(config["reward"], combine=combination.rule)
    if combined is not None:
        previous = dict(previous, reward_combination=combination.summary(combined[1]))
    manifest = dict(previous, config=config, counts=counts, selection=selection.summary(),
                    warnings=[w for w in previous.get("warnings", []) if not w.startswith("selection.")]
                    + selection.warnings,
                    pool_moments=moments(selection), run_id=layout.run_id,
                    reselected_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    timings=dict(previous.get("timings", {}), reselect_s=time.time() - started))
    if not layout.has_parquet(layout.final("rejects")):
        # an output from before empty folders kept their schema gets the 0-row rejects file now
        layout.write_empty("rejects", C.REJECTS_SCHEMA)
    layout.publish(manifest)
    return manifest
