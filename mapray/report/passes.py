"""The report's Ray Data passes over scored/: each maps batches to a small partial result (moments, histograms,
counts) that the driver merges exactly (`mapray.reductions`), so nothing pool-sized ever comes to the driver.

`Context` is what every batch function needs: the variants, the pool moments, the bin edges and the selections
found so far; it is small (edges are a few thousand floats per variant) and travels with each task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mapray import columns as C
from mapray import metrics
from mapray.reductions import BATCH_ROWS, kth_best
from mapray.report import reward_audit, stats
from mapray.report.variants import FLIP, RANDOM, SAMPLE, Variant, report_uniforms, score
from mapray.selection import Selection

TOKENS = (C.CHOSEN_TOKENS, C.REJECTED_TOKENS)
GRAM_CHUNK = 65_536  # rows per membership product (a float32 0/1 matrix of this many rows)


@dataclass
class Context:
    variants: list[Variant]
    pools: dict = field(default_factory=dict)  # `Variant.pool_key` -> metrics.PoolMoments
    rank_edges: list[np.ndarray] = field(default_factory=list)  # per variant
    plot_edges: dict[str, np.ndarray] = field(default_factory=dict)  # per figure histogram
    run_variant: int = 0  # the variant that is the run's own selection (run metric, run alpha)
    by: str | None = None
    selections: list[Selection] = field(default_factory=list)  # per variant, once the cut-offs are known


def columns(table: pa.Table, with_ids: bool = False) -> dict[str, np.ndarray]:
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in
            (C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN, C.SELECTED, FLIP, RANDOM, SAMPLE, *TOKENS)}
    for name in (C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN):
        cols[name] = cols[name].astype(np.float64)
    for name in table.column_names:  # the reward-bias audit's margins and features
        if name in reward_audit.FEATURES.values() or name in reward_audit.model_margins([name])[1:]:
            cols[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    for name in (C.SELECTED, FLIP):
        cols[name] = cols[name].astype(bool)
    if with_ids:
        cols[C.PAIR_ID] = table.column(C.PAIR_ID)
    return cols


def add_uniforms(table: pa.Table, seed: int, noise_seed: int, fraction: float) -> pa.Table:
    """The per-row values seeded by pair_id: the random metric's score, the noise audit's swap, the sample."""
    ids = table.column(C.PAIR_ID).to_pylist()
    flip, sample = report_uniforms(ids, noise_seed)
    return (table.append_column(RANDOM, pa.array(metrics.seeded_uniform(ids, seed)))
            .append_column(FLIP, pa.array(flip < fraction)).append_column(SAMPLE, pa.array(sample)))


def summary(table: pa.Table, sample_fraction: float, margins: list[str]) -> dict:
    """Pool moments as scored and as swapped, the reward-bias audit's moments (`margins`: the audited margin
    columns), and the rows of the bounded sample."""
    cols = columns(table)
    m_ex, m_im = cols[C.EXPLICIT_MARGIN], cols[C.IMPLICIT_MARGIN]
    swapped_ex = np.where(cols[FLIP], -m_ex, m_ex)
    return {"pools": [metrics.PoolMoments.of(m_ex, m_im), metrics.PoolMoments.of(swapped_ex, m_im)],
            "audit": reward_audit.moments_pass(cols, margins),
            "sample": table.filter(pa.array(cols[SAMPLE] < sample_fraction))}


def plot_values(cols: dict[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
    """What the figures' histograms show: both margins, the run's selection score, the response lengths."""
    chosen, rejected = (cols[t].astype(np.float64) for t in TOKENS)
    return {"explicit_margin": cols[C.EXPLICIT_MARGIN], "abs_implicit_margin": np.abs(cols[C.IMPLICIT_MARGIN]),
            "selection_score": score(ctx.variants[ctx.run_variant], cols, ctx.pools),
            "chosen_tokens": chosen, "rejected_tokens": rejected, "length_difference": chosen - rejected}


def histograms(table: pa.Table, ctx: Context) -> dict:
    cols = columns(table)
    flip, selected = cols[FLIP], cols[C.SELECTED]
    ranked = [stats.Hist.of(score(v, cols, ctx.pools), flip, edges) for v, edges in zip(ctx.variants, ctx.rank_edges)]
    plots, sums = {}, {}
    for name, values in plot_values(cols, ctx).items():
        edges = ctx.plot_edges[name]
        clipped = np.clip(values, edges[0], edges[-1])  # beyond the sample's range: counted in the end bins
        plots[name] = np.stack([np.histogram(clipped, edges)[0], np.histogram(clipped[selected], edges)[0]])
        sums[name] = np.array([values.sum(), values[selected].sum()])
    out = {"ranked": ranked, "plots": plots, "sums": sums, "n": np.array([len(selected), selected.sum()])}
    if ctx.by is not None:
        out["groups"] = groups(table, cols, ctx.by)
    return out


def groups(table: pa.Table, cols: dict[str, np.ndarray], by: str) -> dict[str, np.ndarray]:
    """Per value of an input column: rows, selected, sum of m_ex, of |m_im|, of the two response lengths."""
    keys = pc.cast(table.column(by), pa.string()).fill_null("(null)").to_pylist()
    values = np.stack([np.ones(len(keys)), cols[C.SELECTED], cols[C.EXPLICIT_MARGIN], np.abs(cols[C.IMPLICIT_MARGIN]),
                       *(cols[t].astype(np.float64) for t in TOKENS)], axis=1)
    uniq, inverse = np.unique(np.array(keys, dtype=object), return_inverse=True)
    sums = np.zeros((len(uniq), values.shape[1]))
    np.add.at(sums, inverse, values)
    return dict(zip(uniq.tolist(), sums))


def candidates(table: pa.Table, ctx: Context, bounds: dict[int, tuple[float, float]]) -> pa.Table:
    """The rows in each ranking's cut-off bin: (variant, score, pair_id)."""
    cols = columns(table)
    parts = []
    for i, (lo, hi) in bounds.items():
        s = score(ctx.variants[i], cols, ctx.pools)
        where = np.flatnonzero((s >= lo) & (s < hi))
        parts.append(pa.table({"variant": pa.array(np.full(where.size, i), pa.int64()), "score": s[where],
                               C.PAIR_ID: table.column(C.PAIR_ID).take(pa.array(where))}))
    return pa.concat_tables(parts) if parts else pa.table({"variant": pa.array([], pa.int64())})


def one_bin(table: pa.Table, ctx: Context, i: int, lo: float, hi: float) -> pa.Table:
    """The rows of variant i's cut-off bin as (score, pair_id), for Ray's sort when the bin is too large to
    collect (a heavy tie)."""
    s = score(ctx.variants[i], columns(table), ctx.pools)
    where = pa.array(np.flatnonzero((s >= lo) & (s < hi)))
    return pa.table({"score": pa.array(s).take(where), C.PAIR_ID: table.column(C.PAIR_ID).take(where)})


def gram(table: pa.Table, ctx: Context) -> np.ndarray:
    """Intersection counts of every pair of sets: each variant's selection, the run's `selected`, the swapped
    rows. One 0/1 matrix M per chunk of rows; M^T M holds them all."""
    cols = columns(table, with_ids=True)
    keeps = [sel.keeps(score(v, cols, ctx.pools), cols[C.PAIR_ID]) for v, sel in zip(ctx.variants, ctx.selections)]
    member = np.column_stack([*keeps, cols[C.SELECTED], cols[FLIP]]).astype(np.float32)
    total = np.zeros((member.shape[1], member.shape[1]), dtype=np.int64)
    for start in range(0, len(member), GRAM_CHUNK):  # float32 counts exactly up to 2^24 rows per chunk
        chunk = member[start:start + GRAM_CHUNK]
        total += np.rint(chunk.T @ chunk).astype(np.int64)
    return total


def reject_counts(table: pa.Table) -> dict:
    """rejects/ rows per (reason, stage) and per input file (`source` is file:line; null for Parquet input)."""
    by_reason = table.group_by(["reason", "stage"]).aggregate([([], "count_all")]).to_pylist()
    files = [None if s is None else s.rsplit(":", 1)[0] for s in table.column("source").to_pylist()]
    uniq, counts = np.unique(np.array([f or "" for f in files], dtype=object), return_counts=True)
    return {"reasons": {(r["reason"], r["stage"]): r["count_all"] for r in by_reason},
            "files": {f: int(c) for f, c in zip(uniq.tolist(), counts) if f}}


def sort_bin(ds, ctx: Context, i: int, lo: float, hi: float, keep: int) -> tuple[float, str]:
    """The keep-th best row of one bin by Ray's distributed sort (score descending, pair_id ascending), as the
    global pass finds its cut-off."""
    ranked = ds.map_batches(partial(one_bin, ctx=ctx, i=i, lo=lo, hi=hi), batch_format="pyarrow",
                            batch_size=BATCH_ROWS)
    last = kth_best(ranked, ["score", C.PAIR_ID], keep)
    return last["score"], last[C.PAIR_ID]
