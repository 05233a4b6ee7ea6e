"""The one place that knows the order: read -> normalize -> rewards -> policy -> reference -> row metrics ->
staged rows; then the global pass: pool moments -> map, map_unreg, map_z (with the alpha of this pass) ->
selection -> scored/, selected/, rejects/ -> README.md (dataset card) -> manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial

from mapray import __version__
from mapray import columns as C
from mapray import selection as S
from mapray.cache import Namespace, attach_hits, namespace, write_generation
from mapray.config import ConfigError, RayConfig, RunConfig, SelectionConfig, configured_models, to_dict
from mapray.formats import RejectRow, detect_format
from mapray.inputs import InputFiles, discover, read_dataset, read_staged, sample_records
from mapray.manifest import build_manifest, identify_models
from mapray.models import check_model_path
from mapray.normalize import Normalizer, NormalizeSpec, infer_passthrough_schema
from mapray.outputs import OutputLayout, TrlColumns, read_manifest, reject_rows, scored_rows
from mapray.preflight import check_models
from mapray.runtime import LIGHT_TASK_CPUS, checkpointed, checkpointed_rows, init_ray, map_stage, watched
from mapray.stages import LogprobStage, RewardStage, add_row_metrics, policy_from_generation
from mapray.uris import absolute, reachable

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything checked and decided before Ray starts or a model loads."""

    cfg: RunConfig
    files: InputFiles
    spec: NormalizeSpec
    layout: OutputLayout
    warnings: list[str]
    trl: TrlColumns  # how scored/ writes TRL's prompt / chosen / rejected
    models: dict  # each configured model's identity (`mapray.manifest.identify_models`)


def plan(cfg: RunConfig) -> Plan:
    for key, model in configured_models(cfg):
        check_model_path(model.path, f"{key}.path")
    files = discover(cfg.input)
    OutputLayout(cfg.output).check_writable()
    if cfg.cache:
        reachable(cfg.cache, "cache")
    sample = sample_records(files, cfg.input.schema_sample_rows)
    fmt = cfg.input.format
    if fmt == "prompts":
        raise ConfigError("input.format: prompts are sampled from by `mapray selfplay`; `mapray score` needs pairs "
                          "or candidates")
    if fmt == "auto":
        if not sample:
            raise ConfigError(f"input.format: no parseable row in {files.uris[0]} to detect the format from")
        try:
            fmt = detect_format(sample[0], cfg.input.columns)
        except RejectRow as e:
            raise ConfigError(f"input.format: {e}") from None
        log.info("input format detected: %s", fmt)
    if reuses_generation_logps(cfg) and (fmt != "candidates" or "generation_logps" not in (sample or [{}])[0]):
        raise ConfigError("generation.reuse_logps: the input has no generation_logps (only `mapray selfplay`'s "
                          "generated/ rows have them)")
    # before Ray starts: standard rows are plain text (TRL's tokenization), the other formats go through a template
    check_models(cfg, needs_chat_template=fmt != "standard")
    models = identify_models(cfg)  # remembered: a rerun with unchanged checkpoints reads no weights
    layout = OutputLayout(cfg.output, run_id=run_key(cfg, files, models))
    spec = NormalizeSpec(fmt, cfg.input.columns, cfg.reward.source == "columns", cfg.input.max_row_chars, None)
    if files.file_format == "jsonl":  # the own columns' types, from the sample rows this spec would score
        spec = replace(spec, passthrough=infer_passthrough_schema(sample, spec))
    warnings = []
    if cfg.metric.implicit == "dpo" and cfg.reference is not None and cfg.reference.path == cfg.policy.path:
        warnings.append("reference.path equals policy.path: the DPO implicit margin is identically 0, "
                        "so MAP ranks by the explicit margin alone")
    for w in warnings:
        log.warning(w)
    trl = TrlColumns.of(fmt, cfg.input.columns, sample[0] if sample else {})
    return Plan(cfg, files, spec, layout, warnings, trl, models)


def run_key(cfg: RunConfig, files: InputFiles, models: dict) -> str:
    """Names the staging folder: the same config over the same input files (by name, size and modification
    time) and the same model contents resumes there; any change, a checkpoint rewritten in place included,
    starts a fresh run."""
    shas = {key: model["sha256"] for key, model in models.items()}
    return staging_key("run", {"config": to_dict(cfg), "files": files.listing(), "models": shas})


def staging_key(kind: str, payload: dict) -> str:
    """`<kind>-<hash>` of what a staged pass depends on (with mapray's version): the name of its staging folder."""
    text = json.dumps({**payload, "mapray": __version__}, sort_keys=True, default=str)
    return f"{kind}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def normalized_rows(p: Plan):
    """Every input row in canonical form, good or carrying its reject reason, each with a stable row key."""
    ds = read_dataset(p.files, p.cfg.input.limit, num_cpus=LIGHT_TASK_CPUS)
    return ds.map_batches(Normalizer(p.spec), batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)


def cache_namespaces(cfg: RunConfig, models: dict) -> dict[str, tuple[Namespace, str | None]]:
    """Each model stage's cache namespace, with the `pick` its keys take (`mapray.cache.row_keys`); empty
    without a cache."""
    if not cfg.cache:
        return {}
    uri = absolute(cfg.cache)  # resolved here: an actor's working directory is not the driver's
    out = {}
    if cfg.reward.source == "model":
        out["reward"] = (namespace(uri, "reward", RewardStage.KIND, cfg.reward.model,
                                   models["reward.model"]["sha256"]), None)
    pick = out["reward"][0].id if "reward" in out else None  # a reward model picks candidates rows' pairs
    if not reuses_generation_logps(cfg):
        out["policy"] = (namespace(uri, "policy", LogprobStage.KIND, cfg.policy, models["policy"]["sha256"]), pick)
    if cfg.metric.needs_reference_model:
        out["reference"] = (namespace(uri, "reference", LogprobStage.KIND, cfg.reference,
                                      models["reference"]["sha256"]), pick)
    return out


def reuses_generation_logps(cfg: RunConfig) -> bool:
    """Self-play with `generation.reuse_logps`: the policy's log-probs come with the samples, no policy pass."""
    return cfg.generation is not None and cfg.generation.reuse_logps


def score_rows(p: Plan, ds, caches: dict):
    """The model stages and per-row metrics over normalized rows."""
    cfg = p.cfg

    def cache(role: str) -> dict:
        ns, pick = caches.get(role, (None, None))
        return {"cache": ns, "pick": pick}

    if cfg.reward.source == "model":
        ds = map_stage(ds, RewardStage, cfg.reward.model, **cache("reward"))
    if reuses_generation_logps(cfg):
        ds = ds.map_batches(policy_from_generation, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
    else:
        ds = map_stage(ds, LogprobStage, cfg.policy, role="policy", **cache("policy"))
    if cfg.metric.needs_reference_model:
        ds = map_stage(ds, LogprobStage, cfg.reference, role="reference", **cache("reference"))
    return ds.map_batches(add_row_metrics, fn_kwargs={"metric": cfg.metric,
                                                      "rewards_from_columns": cfg.reward.source == "columns"},
                          batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)


def score(cfg: RunConfig, extra: dict | None = None) -> dict:
    """Runs a full scoring job and returns its manifest (with `extra`'s keys added: what a calling loop such as
    self-play records). Rerunning the same command after a crash resumes it: the staging folder is keyed by the
    config, the input files and the models' contents, the normalize pass is redone only if it did not finish, and
    the scoring pass skips every row Ray Data's checkpoint says was already written."""
    started = time.time()
    p = plan(cfg)
    init_ray(cfg.ray, [m for _, m in configured_models(cfg)])
    import ray.data

    models = p.models
    layout = p.layout
    resumed = layout.exists(layout.staged("rows"))
    timings = {"start_s": time.time() - started}  # config checks, Ray start, model identities
    if not layout.is_done("normalized"):
        layout.remove(layout.staged("normalized"))
        normalized_rows(p).write_parquet(layout.staged("normalized"))
        layout.mark_done("normalized")
    timings["normalize_s"] = time.time() - started - timings["start_s"]
    caches = cache_namespaces(cfg, models)
    model_input = look_up_cached(layout, caches)
    timings["cache_lookup_s"] = time.time() - started - timings["start_s"] - timings["normalize_s"]
    done_before = checkpointed_rows(layout.staged("checkpoint"))
    model_pass_at = time.time()
    if not layout.is_done("rows"):
        with checkpointed(layout.staged("checkpoint"), C.ROW) as unwritten, watched():
            normalized = unwritten(read_staged(model_input, num_cpus=LIGHT_TASK_CPUS))
            # light too: a write's default whole CPU would wait beside the model actors until the pass ends
            score_rows(p, normalized, caches).write_parquet(layout.staged("rows"),
                                                            ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})
        layout.mark_done("rows")
    scored_at = time.time()
    timings["model_pass_s"] = scored_at - model_pass_at  # model stages + row metrics + staged write
    rows = ray.data.read_parquet(layout.staged("rows"))
    if caches and layout.has_parquet(layout.staged("rows")):
        for ns, _ in caches.values():  # what this run computed: one generation per namespace
            write_generation(rows, ns, layout.run_id)
    timings["cache_store_s"] = time.time() - scored_at
    scored_at = time.time()
    counts, moments, chosen = finish(rows, layout, cfg.metric.alpha, cfg.selection, trl=p.trl)
    timings.update(global_pass_s=time.time() - scored_at, total_s=time.time() - started)
    manifest = build_manifest(cfg, models, counts, moments, p.warnings,
                              {k: round(v, 3) for k, v in timings.items()}, layout.run_id, p.spec.format)
    manifest["resumed"], manifest["selection"] = resumed, chosen
    manifest["counts"]["scored_this_attempt"] = checkpointed_rows(layout.staged("checkpoint")) - done_before
    manifest.update(extra or {})
    layout.publish(manifest)
    return manifest


def look_up_cached(layout: OutputLayout, caches: dict) -> str:
    """The staged rows the model pass reads: the normalized rows, with their cached values attached when any
    namespace has stored some (a pass of its own: see `mapray.cache`)."""
    stored = {ns.role: ns.stored_files() for ns, _ in caches.values()}
    lookups = [(ns, pick, stored[ns.role]) for ns, pick in caches.values() if stored[ns.role]]
    if not lookups:
        return layout.staged("normalized")
    if not layout.is_done("looked_up"):
        import ray.data

        layout.remove(layout.staged("looked_up"))
        normalized = read_staged(layout.staged("normalized"), num_cpus=LIGHT_TASK_CPUS)
        footers = ray.data.read_parquet(layout.staged("normalized"))  # count and schema from the files' footers
        attach_hits(normalized, lookups, footers.count(), footers.schema().base_schema) \
            .write_parquet(layout.staged("looked_up"))
        layout.mark_done("looked_up")
    return layout.staged("looked_up")


def finish(rows, layout: OutputLayout, alpha: float, sel: SelectionConfig,
           dedupe: bool = True, trl: TrlColumns | None = None) -> tuple[dict, dict, dict]:
    """The global pass over staged rows: the MAP forms with this alpha, the selection, and scored/, selected/ and
    rejects/ written into the staging folder. Returns counts, pool moments and how the selection was made."""
    duplicates = S.duplicate_rejects(rows) if dedupe else {}
    if duplicates:
        rows = rows.map_batches(partial(S.reject_rows_by_key, reasons=duplicates, stage="dedupe"),
                                batch_format="pyarrow")
    good = rows.map_batches(S.only_good, batch_format="pyarrow")
    pool = S.pool_moments(good)
    chosen = S.decide(good, pool, alpha, sel)
    scored = good.map_batches(partial(S.mark_selected, selection=chosen),
                              batch_format="pyarrow").map_batches(partial(scored_rows, trl=trl),
                                                                  batch_format="pyarrow")
    for name in ("scored", "selected", "rejects"):  # a global pass cut short earlier left partial folders
        layout.remove(layout.staged(name))
        layout.ensure(layout.staged(name))
    scored.write_parquet(layout.staged("scored"))
    import ray.data

    if chosen.count:
        ray.data.read_parquet(layout.staged("scored")).map_batches(S.only_selected, batch_format="pyarrow") \
            .write_parquet(layout.staged("selected"))
    rejects = rows.map_batches(S.only_rejected, batch_format="pyarrow").map_batches(
        reject_rows, batch_format="pyarrow").materialize()
    n_rejected = rejects.count()
    if n_rejected:
        rejects.write_parquet(layout.staged("rejects"))
    counts = {"input": pool.explicit.count + n_rejected, "scored": pool.explicit.count,
              "rejected": n_rejected, "selected": chosen.count,
              "rejected_by_reason": _reason_counts(rejects) if n_rejected else {}}
    _keep_schemas(layout, counts, partial(_empty_scored, rows=rows, selection=chosen, trl=trl))
    moments = {"explicit_margin": pool.explicit.to_dict(), "abs_implicit_margin": pool.implicit_abs.to_dict()}
    return counts, moments, chosen.summary()


def _keep_schemas(layout: OutputLayout, counts: dict, empty_scored) -> None:
    """An empty folder gets one 0-row file with its columns: Ray writes no file for no rows, and a reader
    (pyarrow, Ray, pandas, `datasets` streaming) needs one to give a 0-row table instead of an error."""
    if not counts["rejected"]:
        layout.write_empty("rejects", C.REJECTS_SCHEMA)
    if counts["selected"]:
        return
    import ray.data

    if counts["scored"]:  # selected/ takes the exact schema scored/ was written with
        schema = ray.data.read_parquet(layout.staged("scored")).schema().base_schema
    else:
        schema = empty_scored().schema
        layout.write_empty("scored", schema)
    layout.write_empty("selected", schema)


def _empty_scored(rows, selection: S.Selection, trl: TrlColumns | None):
    """A 0-row scored/ table, built by the same steps as the real rows."""
    empty = rows.schema().base_schema.empty_table()
    return scored_rows(S.mark_selected(empty, selection), trl)


def _reason_counts(rejects) -> dict:
    counts = Counter(row["reason"] for row in rejects.select_columns(["reason"]).iter_rows())
    return dict(counts.most_common())


def reselect(uri: str, sel: SelectionConfig, alpha: float | None = None) -> dict:
    """Selects again from an existing scored/ with another metric, ratio or alpha; no model runs."""
    previous = read_manifest(uri)
    alpha = previous["config"]["metric"]["alpha"] if alpha is None else alpha
    init_ray(RayConfig(), [])
    import ray.data

    layout = OutputLayout(uri)
    started = time.time()
    rows = ray.data.read_parquet(layout.final("scored")).map_batches(_as_good_rows, batch_format="pyarrow")
    counts, moments, chosen = finish(rows.materialize(), layout, alpha, sel, dedupe=False)
    counts.update(input=previous["counts"]["input"], rejected=previous["counts"]["rejected"],
                  rejected_by_reason=previous["counts"].get("rejected_by_reason", {}))
    config = dict(previous["config"], selection=to_dict(sel))
    config["metric"] = dict(config["metric"], alpha=alpha)
    manifest = dict(previous, config=config, counts=counts, selection=chosen, pool_moments=moments,
                    run_id=layout.run_id, reselected_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    timings=dict(previous.get("timings", {}), reselect_s=time.time() - started))
    if layout.has_parquet(layout.final("rejects")):
        layout.remove(layout.staged("rejects"))  # the published rejects/ stays as it was
    # else: an output from before empty folders kept their schema gets the 0-row rejects file now
    layout.publish(manifest)
    return manifest


def _as_good_rows(table):
    """scored/ rows back into the shape of staged rows (no reject reason); the MAP forms and `selected` are
    dropped, the global pass computes them again with the reselection's alpha."""
    table = table.drop_columns([c for c in ("map", "map_unreg", "map_z", "selected") if c in table.column_names])
    for name in (C.REJECT, C.REJECT_STAGE, C.RAW, C.SOURCE, C.ROW):
        table = C.set_column(table, name, [None] * table.num_rows, C.INTERNAL_TYPES[name])
    return table

