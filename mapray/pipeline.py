"""The one place that knows the order: read -> normalize -> rewards -> policy -> reference -> row metrics ->
staged rows; then the global pass: pool moments -> map_z -> selection -> scored/, selected/, rejects/ ->
manifest.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial

import fsspec

from mapray import __version__
from mapray import columns as C
from mapray import selection as S
from mapray.config import ConfigError, ModelConfig, RayConfig, RunConfig, SelectionConfig, configured_models, to_dict
from mapray.formats import RejectRow, detect_format
from mapray.inputs import InputFiles, discover, read_dataset, read_staged, sample_records
from mapray.manifest import build_manifest, identify_models
from mapray.models import check_model_path
from mapray.normalize import Normalizer, NormalizeSpec, infer_passthrough_schema
from mapray.outputs import OutputLayout, read_manifest, reject_rows, scored_rows
from mapray.stages import LogprobStage, RewardStage, add_row_metrics
from mapray.uris import absolute

log = logging.getLogger(__name__)

# Reading, normalizing and the per-row metrics are light, I/O-bound tasks: asking a whole CPU each would leave
# them waiting behind the model actors on small machines (Ray Data budgets CPUs across operators).
LIGHT_TASK_CPUS = 0.25


@dataclass
class Plan:
    """Everything checked and decided before Ray starts or a model loads."""

    cfg: RunConfig
    files: InputFiles
    spec: NormalizeSpec
    layout: OutputLayout
    warnings: list[str]


def plan(cfg: RunConfig) -> Plan:
    for key, model in configured_models(cfg):
        check_model_path(model.path, f"{key}.path")
    files = discover(cfg.input)
    layout = OutputLayout(cfg.output, run_id=run_key(cfg, files))
    layout.check_writable()
    sample = sample_records(files, cfg.input.schema_sample_rows)
    fmt = cfg.input.format
    if fmt == "auto":
        if not sample:
            raise ConfigError(f"input.format: no parseable row in {files.uris[0]} to detect the format from")
        try:
            fmt = detect_format(sample[0], cfg.input.columns)
        except RejectRow as e:
            raise ConfigError(f"input.format: {e}") from None
        log.info("input format detected: %s", fmt)
    passthrough = infer_passthrough_schema(sample) if files.file_format == "jsonl" else None
    spec = NormalizeSpec(fmt, cfg.input.columns, cfg.reward.source == "columns", cfg.input.max_row_chars,
                         passthrough)
    warnings = []
    if cfg.metric.implicit == "dpo" and cfg.reference is not None and cfg.reference.path == cfg.policy.path:
        warnings.append("reference.path equals policy.path: the DPO implicit margin is identically 0, "
                        "so MAP ranks by the explicit margin alone")
    for w in warnings:
        log.warning(w)
    return Plan(cfg, files, spec, layout, warnings)


def run_key(cfg: RunConfig, files: InputFiles) -> str:
    """Names the staging folder: the same config over the same input files (by name, size and modification
    time) resumes there; any change starts a fresh run."""
    listing = []
    for uri in files.uris:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
        listing.append([uri, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")])
    payload = json.dumps({"config": to_dict(cfg), "files": listing, "mapray": __version__}, sort_keys=True,
                         default=str)
    return "run-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def init_ray(cfg: RayConfig, models: list[ModelConfig]) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # vLLM reads its settings from the environment: the driver's VLLM_* variables reach every worker
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    env_vars.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # unset, vLLM's CPU backend sized it to 17 GiB here
    env_vars.update(cfg.env_vars)
    kwargs = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return
    num_cpus = cfg.num_cpus or os.cpu_count() or 1
    needed = sum(m.actors * m.cpus_per_actor for m in models)
    # Actor pools hold their CPUs for the whole run; the read and normalize tasks need some left over, or the
    # pipeline waits forever (seen with two 1-CPU actors on a 2-CPU machine).
    if needed > num_cpus - 2 * LIGHT_TASK_CPUS:
        raise ConfigError(f"the model stages' actors need {needed:g} CPUs but the local Ray has {num_cpus}; "
                          "lower actors or cpus_per_actor (fractions are fine)")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)  # never a stray local head


def _map_stage(ds, stage_cls, model: ModelConfig, **kwargs):
    import ray.data

    placement = {}
    if model.engine == "vllm" and model.tensor_parallel_size > 1:
        # vLLM's Ray executor places its shard workers in the placement group its caller runs in: each actor
        # gets a group of one GPU bundle per shard and holds no GPU itself
        placement = {"num_gpus": 0, "ray_remote_args_fn": partial(_tensor_parallel_group, model)}
    return ds.map_batches(
        stage_cls, fn_constructor_kwargs={"cfg": model, **kwargs}, batch_format="pyarrow",
        batch_size=model.batch_size, compute=ray.data.ActorPoolStrategy(size=model.actors),
        num_cpus=model.cpus_per_actor, **({"num_gpus": model.gpus_per_actor} | placement),
    )


def _tensor_parallel_group(model: ModelConfig) -> dict:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [{"CPU": model.cpus_per_actor, "GPU": 1.0}] + [{"GPU": 1.0}] * (model.tensor_parallel_size - 1)
    group = placement_group(bundles, strategy="STRICT_PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def normalized_rows(p: Plan):
    """Every input row in canonical form, good or carrying its reject reason, each with a stable row key."""
    ds = read_dataset(p.files, p.cfg.input.limit, num_cpus=LIGHT_TASK_CPUS)
    return ds.map_batches(Normalizer(p.spec), batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)


def score_rows(p: Plan, ds, models: dict):
    """The model stages and per-row metrics over normalized rows."""
    cfg = p.cfg

    def cache(key: str) -> dict:  # resolved here: an actor's working directory is not the driver's
        return {"model_sha": models[key]["sha256"], "cache_uri": absolute(cfg.cache) if cfg.cache else None}

    if cfg.reward.source == "model":
        ds = _map_stage(ds, RewardStage, cfg.reward.model, **cache("reward.model"))
    ds = _map_stage(ds, LogprobStage, cfg.policy, role="policy", **cache("policy"))
    if cfg.metric.needs_reference_model:
        ds = _map_stage(ds, LogprobStage, cfg.reference, role="reference", **cache("reference"))
    return ds.map_batches(add_row_metrics, fn_kwargs={"metric": cfg.metric,
                                                      "rewards_from_columns": cfg.reward.source == "columns"},
                          batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)


def checkpointed_rows(uri: str) -> int:
    """Rows Ray Data's checkpoint records as written (its id files are Parquet)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return 0
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in fs.find(path) if f.endswith(".parquet"))


@contextlib.contextmanager
def checkpointed(path: str, id_column: str):
    """Ray Data's own job checkpointing for the writes inside: each written row's id is recorded under `path`,
    and a rerun of the same pipeline skips the rows already written."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    previous = ctx.checkpoint_config
    # kept on success: the staging folder, checkpoint included, goes only once the run is published
    ctx.checkpoint_config = CheckpointConfig(id_column=id_column, checkpoint_path=path,
                                             delete_checkpoint_on_success=False)
    try:
        yield
    finally:
        ctx.checkpoint_config = previous


def score(cfg: RunConfig) -> dict:
    """Runs a full scoring job and returns its manifest. Rerunning the same command after a crash resumes it:
    the staging folder is keyed by the config and the input files, the normalize pass is redone only if it did
    not finish, and the scoring pass skips every row Ray Data's checkpoint says was already written."""
    started = time.time()
    p = plan(cfg)
    init_ray(cfg.ray, [m for _, m in configured_models(cfg)])
    import ray.data

    models = identify_models(cfg)
    layout = p.layout
    resumed = layout.exists(layout.staged("rows"))
    timings = {"start_s": time.time() - started}  # config checks, Ray start, model identities
    if not layout.is_done("normalized"):
        layout.remove(layout.staged("normalized"))
        normalized_rows(p).write_parquet(layout.staged("normalized"))
        layout.mark_done("normalized")
    timings["normalize_s"] = time.time() - started - timings["start_s"]
    done_before = checkpointed_rows(layout.staged("checkpoint"))
    model_pass_at = time.time()
    if not layout.is_done("rows"):
        with checkpointed(layout.staged("checkpoint"), C.ROW):
            normalized = read_staged(layout.staged("normalized"), num_cpus=LIGHT_TASK_CPUS)
            score_rows(p, normalized, models).write_parquet(layout.staged("rows"))
        layout.mark_done("rows")
    scored_at = time.time()
    timings["model_pass_s"] = scored_at - model_pass_at  # model stages + row metrics + staged write
    counts, moments = finish(ray.data.read_parquet(layout.staged("rows")), layout, cfg.metric.alpha,
                             cfg.selection)
    timings.update(global_pass_s=time.time() - scored_at, total_s=time.time() - started)
    manifest = build_manifest(cfg, models, counts, moments, p.warnings,
                              {k: round(v, 3) for k, v in timings.items()}, layout.run_id)
    manifest["resumed"] = resumed
    manifest["counts"]["scored_this_attempt"] = checkpointed_rows(layout.staged("checkpoint")) - done_before
    layout.publish(manifest)
    return manifest


def finish(rows, layout: OutputLayout, alpha: float, sel: SelectionConfig,
           dedupe: bool = True) -> tuple[dict, dict]:
    """The global pass over staged rows: writes scored/, selected/ and rejects/ into the staging folder."""
    duplicates = S.duplicate_rejects(rows) if dedupe else {}
    if duplicates:
        rows = rows.map_batches(partial(S.reject_rows_by_key, reasons=duplicates, stage="dedupe"),
                                batch_format="pyarrow")
    good = rows.map_batches(S.only_good, batch_format="pyarrow")
    pool = S.pool_moments(good)
    cut = S.find_cutoff(good, pool, alpha, sel)
    scored = good.map_batches(partial(S.mark_selected, selection=cut, alpha=alpha, sel=sel),
                              batch_format="pyarrow").map_batches(scored_rows, batch_format="pyarrow")
    for name in ("scored", "selected", "rejects"):  # a global pass cut short earlier left partial folders
        layout.remove(layout.staged(name))
        layout.ensure(layout.staged(name))
    scored.write_parquet(layout.staged("scored"))
    import ray.data

    written = ray.data.read_parquet(layout.staged("scored")) if pool.explicit.count else None
    if written is not None:
        written.map_batches(S.only_selected, batch_format="pyarrow").write_parquet(layout.staged("selected"))
    rejects = rows.map_batches(S.only_rejected, batch_format="pyarrow").map_batches(
        reject_rows, batch_format="pyarrow").materialize()
    n_rejected = rejects.count()
    if n_rejected:
        rejects.write_parquet(layout.staged("rejects"))
    counts = {"input": pool.explicit.count + n_rejected, "scored": pool.explicit.count,
              "rejected": n_rejected, "selected": cut.count,
              "rejected_by_reason": _reason_counts(rejects) if n_rejected else {}}
    moments = {"explicit_margin": pool.explicit.to_dict(), "abs_implicit_margin": pool.implicit_abs.to_dict()}
    return counts, moments


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
    counts, moments = finish(rows.materialize(), layout, alpha, sel, dedupe=False)
    counts.update(input=previous["counts"]["input"], rejected=previous["counts"]["rejected"],
                  rejected_by_reason=previous["counts"].get("rejected_by_reason", {}))
    config = dict(previous["config"], selection=to_dict(sel))
    config["metric"] = dict(config["metric"], alpha=alpha)
    manifest = dict(previous, config=config, counts=counts, pool_moments=moments, run_id=layout.run_id,
                    reselected_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    timings=dict(previous.get("timings", {}), reselect_s=time.time() - started))
    layout.remove(layout.staged("rejects"))  # empty here: the published rejects/ stays as it was
    layout.publish(manifest)
    return manifest


def _as_good_rows(table):
    """scored/ rows back into the shape of staged rows (no reject reason), recomputing map_z/selected."""
    table = table.drop_columns([c for c in ("map_z", "selected") if c in table.column_names])
    for name in (C.REJECT, C.REJECT_STAGE, C.RAW, C.SOURCE, C.ROW):
        table = C.set_column(table, name, [None] * table.num_rows, C.INTERNAL_TYPES[name])
    return table

