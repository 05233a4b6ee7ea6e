"""The report's numbers: Ray Data passes over scored/ (no model runs, never the whole pool on the driver).

1. read the columns the report needs, add per-row values seeded by pair_id (the noise audit's swap, the figures'
   sample, the random metric), materialize once;
2. pool moments, as scored and with the swapped pairs (map_z z-scores over the pool it ranks), and a bounded sample;
3. histograms: every compared selection's score on edges at quantiles of its sample scores, split swapped /
   not swapped, with each bin's extreme values; the figures' histograms; length sums; per-group sums;
4. cut-offs: step 3 says which bin holds each ranking's k-th row; only the rows of those bins (about n / bins each)
   come to the driver, sorted by (score desc, pair_id asc) as the global pass ranks; a bin too large for that (a
   heavy tie) goes through Ray's distributed sort;
5. membership: every row's keep flag under every selection as a 0/1 matrix M per batch; M^T M holds every
   intersection at once (Jaccard, set sizes, swapped rows kept), summed over batches.
The noise audit's AUC is a rank sum over the histograms of step 3, reported with the bound on its error (pairs
within one bin count 1/2; a bin holding a single value is exact, so a small pool or a discrete score is exact).
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mapray import columns as C
from mapray import histograms, metrics
from mapray.config import SelectionConfig
from mapray.errors import ConfigError
from mapray.groups import check_group_column
from mapray.reasons import code_of
from mapray.reductions import BATCH_ROWS, reduce
from mapray.report import passes as P
from mapray.report import reward_audit, stats
from mapray.report.settings import ReportSettings
from mapray.report.variants import Variant, plan, same_size_rule, score
from mapray.selection import Selection
from mapray.typed_config import from_dict

NEEDED = [C.PAIR_ID, C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN, C.SELECTED, *P.TOKENS]
PLOT_BINS = 60


def scored_schema(uri: str) -> pa.Schema:
    fs, path = fsspec.core.url_to_fs(f"{uri}/scored")
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.exists(path) else []
    if not files:
        raise ConfigError(f"no Parquet files under {uri}/scored: not a finished mapray output")
    with fs.open(files[0], "rb") as f:
        schema = pq.read_schema(f)
    missing = [c for c in NEEDED if c not in schema.names]
    if missing:
        raise ConfigError(f"{uri}/scored has no column {missing[0]!r}: written by an older mapray?")
    return schema


def check(uri: str, settings: ReportSettings) -> None:
    """What can be wrong before Ray starts: the settings, scored/'s columns, the --by column."""
    settings.check()
    check_group_column(scored_schema(uri), settings.by, "--by", "scored/")


def run_selection(manifest: dict) -> tuple[SelectionConfig, float]:
    """How the run selected (after a reselection, the reselection's rule and alpha)."""
    config = manifest["config"]
    return from_dict(SelectionConfig, config["selection"], "selection"), float(config["metric"]["alpha"])


def compute(uri: str, manifest: dict, settings: ReportSettings) -> tuple[dict, pa.Table | None]:
    """The numbers of report.json (without the run's own manifest entries) and the figures' sample, for the
    published output at `uri`."""
    import ray.data

    run, alpha = run_selection(manifest)
    rows = ray.data.read_parquet(f"{uri}/scored").select_columns(needed(settings, scored_schema(uri).names))
    fs, path = fsspec.core.url_to_fs(f"{uri}/rejects")
    rejects = None
    if fs.exists(path) and any(p.endswith(".parquet") for p in fs.find(path)):
        rejects = ray.data.read_parquet(f"{uri}/rejects").select_columns(["reason", "stage", "source"])
    return compute_rows(rows, rejects, run, alpha, manifest["counts"]["selected"], settings)


def needed(settings: ReportSettings, names: list[str]) -> list[str]:
    """What the report reads of scored rows whose columns are `names`: the reward-bias audit reads the responses
    and each reward model's margin too."""
    audit = [c for c in ("chosen", "rejected") if c in names] + reward_audit.model_margins(names)[1:]
    return NEEDED + audit + ([settings.by] if settings.by and settings.by not in NEEDED + audit else [])


def compute_rows(rows, rejects, run: SelectionConfig, alpha: float, selected: int,
                 settings: ReportSettings) -> tuple[dict, pa.Table | None]:
    """The report's numbers over scored rows (`rows`: a Dataset with `needed` columns, `selected` as `run` with
    `alpha` chose it) and the rows set aside (`rejects`: reason, stage, source; None for none)."""
    rows = rows.map_batches(
        partial(P.add_uniforms, seed=run.seed, noise_seed=settings.noise_seed, fraction=settings.noise_fraction),
        batch_format="pyarrow", batch_size=BATCH_ROWS).map_batches(
        reward_audit.add_features, batch_format="pyarrow", batch_size=BATCH_ROWS).materialize()
    n, rejects = rows.count(), _rejects(rejects)
    if n == 0:
        return {"scored": 0, "selected": 0, "rejects": rejects, "settings": asdict(settings)}, None
    variants = plan(run, alpha, selected, settings.alphas)
    ctx = P.Context(variants, by=settings.by,
                    run_variant=next(i for i, v in enumerate(variants) if v.metric == run.metric))
    margins = reward_audit.model_margins(rows.schema().names)
    first = reduce(rows, P.summary, sample_fraction=min(1.0, settings.sample_rows / n), margins=margins)
    ctx.pools = dict(zip((False, True), first["pools"]))
    # the reward-bias audit's variants: known only now (lambda scales with the pool's spreads)
    for bias in reward_audit.plan(first["audit"], margins, settings.bias_fractions):
        ctx.pools[bias] = reward_audit.pool(bias, first["audit"], margins, ctx.pools[False].implicit_abs)
        ctx.variants += [Variant("bias", metric, alpha, same_size_rule(run, selected), bias=bias)
                         for metric in reward_audit.metrics_read_by_bias(run.metric)]
    sample = P.columns(first["sample"])
    ctx.rank_edges = [histograms.rank_edges(score(v, sample, ctx.pools), settings.rank_bins) for v in variants]
    ctx.plot_edges = {name: _plot_edges(values) for name, values in P.plot_values(sample, ctx).items()}
    hists = reduce(rows, P.histograms, ctx=ctx)
    ctx.selections = _selections(rows, ctx, hists["ranked"], n, run.seed)
    gram = reduce(rows, P.gram, ctx=ctx)
    numbers = _numbers(ctx, hists, gram, rejects, n, settings, run, alpha)
    numbers["reward_audit"] = _reward_audit(ctx, gram, first["audit"], margins, run.metric)
    return numbers, first["sample"]


def _reward_audit(ctx: P.Context, gram: np.ndarray, audit: dict, margins: list[str], run_metric: str) -> dict:
    """Each audited variant against the selection the same metric makes without the bias (the overlap table's
    for the run's margin, the model's own for a model's) and against the run's selection."""
    jac = stats.jaccard(gram)
    run_col = len(ctx.variants)
    unbiased = {(reward_audit.RUN_MARGIN, v.metric): i for i, v in enumerate(ctx.variants) if v.group == "overlap"}
    unbiased.update({(v.bias.margin, v.metric): i for i, v in enumerate(ctx.variants)
                     if v.group == "bias" and v.bias.kind is None})
    at = [i for i, v in enumerate(ctx.variants) if v.group == "bias"]
    rows = [{"metric": ctx.variants[i].metric, "selected": int(gram[i, i]), "jaccard_with_run": jac[i, run_col],
             "jaccard_with_unbiased": jac[i, unbiased[ctx.variants[i].bias.margin, ctx.variants[i].metric]]}
            for i in at]
    own = [i for i in at if ctx.variants[i].bias.kind is None and ctx.variants[i].metric == run_metric]
    return reward_audit.numbers(audit, margins, [ctx.variants[i].bias for i in at], rows, jac, own)


def _plot_edges(values: np.ndarray) -> np.ndarray:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    return np.linspace(lo - 0.5, hi + 0.5, PLOT_BINS + 1) if lo == hi else np.linspace(lo, hi, PLOT_BINS + 1)


def _selections(rows, ctx: P.Context, ranked: list[stats.Hist], n: int, seed: int) -> list[Selection]:
    """Every variant's Selection: a threshold needs nothing more; a ranking's cut-off row is found in its bin."""
    found: dict[int, tuple[float, str] | None] = {}
    small: dict[int, tuple[float, float]] = {}
    tops: dict[int, histograms.TopBin] = {}
    for i, v in enumerate(ctx.variants):
        if v.rule[0] == "threshold":
            continue
        k = metrics.selection_count(n, *v.rule)
        if k == 0:
            found[i] = None
            continue
        tops[i] = histograms.top_bin(ranked[i].counts.sum(axis=0), k)
        bounds = histograms.bin_bounds(ctx.rank_edges[i], tops[i].bin)
        if tops[i].size <= histograms.COLLECT_LIMIT:
            small[i] = bounds
        else:
            found[i] = P.sort_bin(rows, ctx, i, *bounds, keep=tops[i].keep)
    if small:
        batches = rows.map_batches(partial(P.candidates, ctx=ctx, bounds=small), batch_format="pyarrow",
                                   batch_size=BATCH_ROWS).iter_batches(batch_format="pyarrow", batch_size=None)
        table = pa.concat_tables([b for b in batches if b.num_rows])
        for i in small:
            mine = table.filter(pc.equal(table.column("variant"), i))
            ranked_rows = mine.sort_by([("score", "descending"), (C.PAIR_ID, "ascending")])
            last = ranked_rows.slice(tops[i].keep - 1, 1).to_pylist()[0]
            found[i] = (last["score"], last[C.PAIR_ID])
    return [Selection(v.config(seed), v.alpha, ctx.pools[v.flipped],
                      metrics.selection_count(n, *v.rule) if v.rule[0] != "threshold" else 0, found.get(i))
            for i, v in enumerate(ctx.variants)]


def _rejects(rejects) -> dict:
    """rejects/ by reason code and stage (with the commonest detail of each), and by input file (JSONL input only:
    Parquet rows carry no source). The code is read off the reason (`mapray.reasons`), so an output published
    before rejects/ had `reason_code` reads the same."""
    counts = reduce(rejects, P.reject_counts) if rejects is not None else None
    counts = counts or {"reasons": {}, "files": {}}
    grouped: dict[tuple[str, str], dict] = {}
    for (reason, stage), n in sorted(counts["reasons"].items(), key=lambda kv: (-kv[1], kv[0][0])):
        entry = grouped.setdefault((code_of(reason), stage), {"count": 0, "example": reason})
        entry["count"] += n
    return {"by_code": [{"code": code, "stage": stage, **entry} for (code, stage), entry in
                        sorted(grouped.items(), key=lambda kv: (-kv[1]["count"], kv[0]))],
            "by_file": [{"file": f, "count": c} for f, c in sorted(counts["files"].items())]}


def _numbers(ctx: P.Context, hists: dict, gram: np.ndarray, rejects: dict, n: int, settings: ReportSettings,
             run: SelectionConfig, alpha: float) -> dict:
    jac = stats.jaccard(gram)
    run_col, flip_col = len(ctx.variants), len(ctx.variants) + 1
    n_selected, n_flipped = int(gram[run_col, run_col]), int(gram[flip_col, flip_col])
    rows = {"overlap": [], "alpha": [], "noise": []}
    for i, v in enumerate(ctx.variants):
        if v.group not in rows:
            continue  # the reward-bias audit's: `_reward_audit`
        row = {"metric": v.metric, "alpha": v.alpha, "selected": int(gram[i, i]), "jaccard_with_run": jac[i, run_col]}
        if v.group == "noise":
            auc, bound = stats.auc_flipped_below(hists["ranked"][i])
            row.update(swapped_selected=int(gram[i, flip_col]),
                       share_swapped_selected=gram[i, flip_col] / n_flipped if n_flipped else None,
                       auc=auc, auc_error_bound=bound)
        rows[v.group].append(row)
    overlap = [i for i, v in enumerate(ctx.variants) if v.group == "overlap"]
    first = {g: next(v for v in ctx.variants if v.group == g) for g in rows}
    return {
        "scored": n, "selected": n_selected,
        "cutoff": _cutoff(run, alpha, ctx.selections[ctx.run_variant]),
        "alpha_sweep": {"metric": first["alpha"].metric, "rule": first["alpha"].rule, "rows": rows["alpha"]},
        "overlap": {"rule": first["overlap"].rule, "rows": rows["overlap"],
                    "metrics": [r["metric"] for r in rows["overlap"]], "jaccard": jac[np.ix_(overlap, overlap)]},
        "noise_audit": {"fraction": settings.noise_fraction, "seed": settings.noise_seed, "swapped": n_flipped,
                        "rule": first["noise"].rule, "chance_share": rows["noise"][0]["selected"] / n,
                        "rows": rows["noise"]},
        "length_bias": _length_bias(hists, n, n_selected),
        "distributions": {name: {"edges": ctx.plot_edges[name], "pool": c[0], "selected": c[1]}
                          for name, c in hists["plots"].items()},
        "rejects": rejects,
        "by": _groups(hists.get("groups"), settings.by),
        "settings": asdict(settings),
    }


def _cutoff(run: SelectionConfig, alpha: float, sel: Selection) -> dict:
    """The run's cut-off: its threshold, or the score and pair_id of its last kept row."""
    rule, value = run.rule
    out = {"metric": run.metric, "alpha": alpha, "rule": rule, "value": value, "score": None, C.PAIR_ID: None}
    if rule == "threshold":
        out["score"] = value
    elif sel.cutoff is not None:
        out["score"], out[C.PAIR_ID] = sel.cutoff
    return out


def _length_bias(hists: dict, n: int, n_selected: int) -> dict:
    out = {}
    for name in ("chosen_tokens", "rejected_tokens", "length_difference"):
        total, selected = hists["sums"][name]
        out[name] = {"pool": total / n, "selected": selected / n_selected if n_selected else None}
    return out


MAX_GROUPS = 50


def _groups(groups: dict | None, by: str | None) -> dict | None:
    if by is None:
        return None
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    rows = [{"value": key, "scored": int(s[0]), "selected": int(s[1]), "share_selected": s[1] / s[0],
             "mean_explicit_margin": s[2] / s[0], "mean_abs_implicit_margin": s[3] / s[0],
             "mean_chosen_tokens": s[4] / s[0], "mean_rejected_tokens": s[5] / s[0]} for key, s in ordered[:MAX_GROUPS]]
    return {"column": by, "groups": rows, "groups_not_shown": max(0, len(ordered) - MAX_GROUPS)}
