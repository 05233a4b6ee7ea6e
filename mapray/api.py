"""mapray as a library: score and select a Ray Dataset of preference pairs from Python.

The shape is Ray Data LLM's: a processor built once from a config, called on a Dataset, giving a Dataset back.

    scorer = mapray.Scorer(config)          # checks the config and the models' files; nothing runs yet
    scored = scorer(ds)                      # lazy: mapray's columns added to every row
    selected, decision = mapray.select(scored, ratio=0.4, alpha=1.0)   # the pool's moments and cut-off
    good, rejects = mapray.split_rejects(selected)

`ds` may come from `read_parquet`, `read_json`, `from_huggingface`, `from_pandas`, `from_items` or any step of
the user's own: its rows are one of the input formats `mapray score` reads. The calls use the Ray this process
is connected to (`ray.init(address=...)` for a cluster) and start an embedded local one only when there is none.
`mapray score` and the other runs (`mapray.pipeline`, `mapray.generation.run`) are these same steps with
staging, resume, the score cache and publishing around them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial

from mapray import columns as C
from mapray.config import (
    RunConfig,
    SelectionConfig,
    check_alpha,
    check_scoring,
    colocates_models,
    configured_models,
    reward_models,
)
from mapray.ensemble import Combination, combine_rewards, combined_margins
from mapray.errors import ConfigError
from mapray.formats import RejectRow, detect_format
from mapray.groups import check_group_column
from mapray.models import check_model_path
from mapray.normalize import Normalizer, NormalizeSpec
from mapray.preflight import check_models
from mapray.public_rows import TrlColumns, public_rows, reject_rows
from mapray.runtime import LIGHT_TASK_CPUS, ensure_ray, map_actor_pool, map_stage, shared_pool, tune_ray_data, watched
from mapray.selection import Selection, decide, mark
from mapray.stages import (
    LogprobStage,
    ModelChain,
    RewardStage,
    Step,
    add_row_metrics,
    from_cache,
    policy_from_generation,
    reward_role,
)

log = logging.getLogger(__name__)
__all__ = ["InputShape", "Scorer", "make_report", "select", "split_rejects"]


@dataclass(frozen=True)
class InputShape:
    """What a scorer needs to know of its input before the first batch: the format (auto resolved from a row)
    and how TRL's columns are written."""

    spec: NormalizeSpec
    trl: TrlColumns

    @property
    def format(self) -> str:
        return self.spec.format


class Scorer:
    """Scores Datasets of preference pairs under one config (`mapray.config.RunConfig`: its input's format and
    column names, policy, reference, reward and metric sections; input.uri and output are the file runs').

    `scorer(ds)` returns a lazy Dataset: TRL's `prompt`, `chosen`, `rejected` (the pair scored, explicit prompt),
    the row's own columns, then rewards, margins, log-probs, token counts, truncation flags and implicit rewards
    (`mapray.columns.SCORED` without the selection's columns). A row that cannot be scored does not raise: it
    comes back with its reason in `reject_reason` (and `reject_stage`, `reject_source`, `reject_raw`), null on
    every other row. One Dataset with a reason column rather than two Datasets: the model pass runs once and
    stays lazy, where a second Dataset would need the pool materialized or the models run twice;
    `split_rejects` separates them in one call.
    """

    def __init__(self, config: RunConfig):
        self.config = check_scoring(config)
        for key, model in configured_models(config):
            check_model_path(model.path, f"{key}.path")
        self.warnings = []
        if config.metric.implicit == "dpo" and config.reference.path == config.policy.path:
            self.warnings.append("reference.path equals policy.path: the DPO implicit margin is identically 0, "
                                 "so MAP ranks by the explicit margin alone")
        for warning in self.warnings:
            log.warning(warning)
        self._checked_formats: set[str] = set()

    def __call__(self, ds):
        """`ds` (any Dataset of pairs) -> public rows (the class docstring). One row is read now to learn the
        input's shape (its format and TRL's column form), as `mapray score` reads its files' first rows."""
        ensure_ray(self.config.ray, [m for _, m in configured_models(self.config)])
        shape = self.shape(_first_rows(ds))
        return self.public(self.score(self.normalize(ds, shape)), shape)

    def shape(self, sample: list[dict], source: str | None = None) -> InputShape:
        """The input's shape from its first rows (read from `source`, if named), the models checked against it
        before any of them loads."""
        cfg = self.config
        fmt = cfg.input.format
        if fmt == "prompts":
            raise ConfigError("input.format: prompts are sampled from by `mapray selfplay`; `mapray score` needs "
                              "pairs or candidates")
        if fmt == "auto":
            if not sample:
                raise ConfigError(f"input.format: no parseable row{f' in {source}' if source else ''} to detect "
                                  "the format from")
            try:
                fmt = detect_format(sample[0], cfg.input.columns)
            except RejectRow as e:
                raise ConfigError(f"input.format: {e}") from None
            log.info("input format detected: %s", fmt)
        if self.reuses_generation_logps and (fmt != "candidates" or "generation_logps" not in (sample or [{}])[0]):
            raise ConfigError("generation.reuse_logps: the input has no generation_logps (only `mapray selfplay`'s "
                              "generated/ rows have them)")
        if fmt not in self._checked_formats:
            # standard rows are plain text (TRL's tokenization); the other formats go through a chat template
            check_models(cfg, needs_chat_template=fmt != "standard")
            self._checked_formats.add(fmt)
        spec = NormalizeSpec(fmt, cfg.input.columns, cfg.reward.source == "columns", cfg.input.max_row_chars, None)
        return InputShape(spec, TrlColumns.of(fmt, cfg.input.columns, sample[0] if sample else {}))

    @property
    def reuses_generation_logps(self) -> bool:
        """Self-play with `generation.reuse_logps`: the policy's log-probs come with the samples, no policy pass."""
        return self.config.generation is not None and self.config.generation.reuse_logps

    # --- the steps, in order; the runs put their staging between them ---

    def normalize(self, ds, shape: InputShape):
        """Every input row in canonical form (internal columns), good or carrying its reject reason."""
        return ds.map_batches(Normalizer(shape.spec), batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)

    def score(self, ds, caches: dict | None = None, complete: frozenset[str] = frozenset()):
        """The model stages and the per-row metrics over normalized rows; `caches`: each model stage's cache
        namespace and pick (`mapray.pipeline.cache_namespaces`), none outside a run with a cache; `complete`: the
        roles with no row to run their model on (`mapray.pipeline.complete_namespaces`: cached values cover every
        row; `roles_without_rows`: none reaches the pass): their stages run in light tasks, no actor started, no
        model loaded, no GPU held. With the models colocated
        (`RunConfig.colocate_models`) every step runs in one actor pool, unless no model needs to run at all."""
        steps = self.model_steps(caches or {}, complete)
        models = [step.model for step in steps if step.model is not None]
        if models and colocates_models(self.config):
            return map_actor_pool(ds, ModelChain, {"steps": steps, "cpus": shared_pool(models).cpus_per_actor},
                                  shared_pool(models))
        for step in steps:
            if step.model is not None:
                ds = map_stage(ds, step.fn, step.model, **step.kwargs)
            else:
                ds = ds.map_batches(step.fn, fn_kwargs=step.kwargs, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
        return ds

    def model_steps(self, caches: dict, complete: frozenset[str]) -> list[Step]:
        """The model pass in order: each reward model, their combination, the policy, the reference, the row
        metrics. A model whose role is `complete` is a light step that reads its values from the cache (if any)."""
        cfg = self.config

        def stage(stage_cls, model, cache_role: str, **kwargs) -> Step:
            ns, pick = caches.get(cache_role, (None, None))
            kwargs.update(cache=ns, pick=pick)
            if cache_role in complete:
                return Step(from_cache, {"stage_cls": stage_cls, "kwargs": {"cfg": model, **kwargs}})
            return Step(stage_cls, kwargs, model)

        # each reward model its own stage; several are then combined
        steps = [stage(RewardStage, model, reward_role(name), name=name) for _, name, model in reward_models(cfg)]
        combination = Combination.of(cfg.reward)
        if combination is not None:
            steps.append(Step(combine_rewards, {"combination": combination,
                                                "set_aside": cfg.reward.on_sign_disagreement == "set_aside"}))
        if self.reuses_generation_logps:
            steps.append(Step(policy_from_generation, {}))
        else:
            steps.append(stage(LogprobStage, cfg.policy, "policy", role="policy"))
        if cfg.metric.needs_reference_model:
            steps.append(stage(LogprobStage, cfg.reference, "reference", role="reference"))
        steps.append(Step(add_row_metrics, {"metric": cfg.metric,
                                            "rewards_from_columns": cfg.reward.source == "columns"}))
        return steps

    def public(self, ds, shape: InputShape):
        """Scored internal rows -> public rows."""
        return ds.map_batches(public_rows, fn_kwargs={"trl": shape.trl}, batch_format="pyarrow",
                              num_cpus=LIGHT_TASK_CPUS)

    def select(self, ds, combine: str | None = None) -> tuple[object, Selection]:
        """`select` with this config's selection, alpha and (several reward models) combination; `combine` in
        place of the configured `reward.combine`."""
        return select(ds, self.config.selection, alpha=self.config.metric.alpha,
                      combination=Combination.of(self.config.reward, combine))


def select(ds, selection: SelectionConfig | None = None, *, alpha: float = 1.0,
           combination: Combination | None = None, **rule) -> tuple[object, Selection]:
    """Selects from a scored Dataset (a scorer's rows, or scored/ read back): pool moments, duplicates and the
    cut-off with Ray Data passes, then every row marked. `selection` or the rule as keywords (`metric`, `ratio`,
    `top_k`, `threshold`, `seed`: `mapray.config.SelectionConfig`, checked alike); `alpha` weighs the implicit
    margin in the MAP forms; `combination` (`mapray.ensemble.Combination`: the reward models' names, weights
    and rule; `Scorer.select` passes its config's): rows of several reward models get their explicit margin
    and `reward_margin_spread` from the pool first, as a run's global pass does.

    Returns (rows, decision): every row given, with `map`, `map_unreg`, `map_z` and `selected` (rows set aside,
    before or here as copies of a duplicated pair_id, have null forms and are not selected), and the decision
    (`Selection`: rule, cut-off, counts; `decision.summary()` is what a run's manifest records). The rows are
    read several times, so they are materialized once here (a scorer's model pass never runs twice)."""
    sel = selection or SelectionConfig()
    if rule:
        sel = dataclasses.replace(sel, **rule)
    check_alpha(alpha, "alpha")
    ensure_ray()
    keyed = ds.map_batches(_keyed, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
    with watched(ctx=keyed.context):  # a pipeline that cannot be scheduled stops with one line, not a hang
        pool = keyed.materialize()
    tune_ray_data(pool.context)  # this pool's own context (a copy): the caller's Ray Data settings stay as they are
    check_group_column(pool.schema().base_schema, sel.by, "selection.by", "the Dataset")
    if combination is not None:
        pool, _ = combined_margins(pool, combination)
        with watched(ctx=pool.context):
            pool = pool.materialize()
    decision = decide(pool, sel, alpha, key=C.ROW)
    return pool.map_batches(partial(_marked, selection=decision), batch_format="pyarrow"), decision


def split_rejects(ds) -> tuple[object, object]:
    """(good rows without the reject columns, rejects as rejects/ holds them: pair_id, reason, stage, source,
    raw). Both read `ds`: a Dataset that is not materialized yet is materialized once here."""
    import ray.data
    from ray.data.dataset import MaterializedDataset
    from ray.data.expressions import col

    if not isinstance(ds, MaterializedDataset):
        with watched(ctx=ds.context):
            ds = ds.materialize()
    if C.REJECT_REASON not in ds.schema().names:
        return ds, ray.data.from_arrow(C.REJECTS_SCHEMA.empty_table())
    good = ds.filter(expr=col(C.REJECT_REASON).is_null()).drop_columns(list(C.REJECT_COLUMNS))
    rejects = ds.filter(expr=col(C.REJECT_REASON).is_not_null()).map_batches(reject_rows, batch_format="pyarrow")
    return good, rejects


def make_report(source, selection: Selection | None = None, settings=None, out: str | None = None) -> dict:
    """The report's numbers (`mapray report`: counts, cut-off, alpha sweep, overlap of the metrics, length bias,
    noise audit, rejects by reason; `settings`: `mapray.report.ReportSettings`). `source`: the URI of a published
    output (the page is written to <output>/report/, as the command does), or the rows `select` returned with its
    `selection` (the page is written to the folder `out` when one is given). No model runs."""
    from mapray.report import report as report_output
    from mapray.report import report_rows

    if isinstance(source, str):
        return report_output(source, settings)
    if selection is None:
        raise ConfigError("report: a Dataset's report needs the selection `select` returned with it")
    ensure_ray()
    return report_rows(source, selection, settings, out)


def _first_rows(ds, n: int = 1) -> list[dict]:
    """The first rows of `ds` as Python values (Arrow's: lists stay lists, whatever the source's batch type)."""
    from mapray.inputs import table_rows

    try:
        table = ds.take_batch(n, batch_format="pyarrow")
    except ValueError:  # an empty Dataset
        return []
    rows, reasons = table_rows(table)
    return [row for row, reason in zip(rows, reasons) if reason is None]


def _keyed(table):
    """A unique row key for the selection (copies of a duplicated pair_id are told apart by it), and the reject
    columns where the rows have none (scored/ read back)."""
    import uuid

    import pyarrow as pa

    for name, type_ in C.REJECT_COLUMNS.items():
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, type_))
    return C.set_column(table, C.ROW, [uuid.uuid4().hex for _ in range(table.num_rows)], pa.string())


def _marked(table, selection: Selection):
    """The decision applied to a block: the selection's columns after mapray's, the reject columns last."""
    table = mark(table, selection, key=C.ROW).drop_columns([C.ROW])
    rejects = [c for c in C.REJECT_COLUMNS if c in table.column_names]
    return table.select([c for c in table.column_names if c not in rejects] + rejects)
