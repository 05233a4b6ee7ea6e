"""The selection decision over a whole scored pool of public rows: duplicates, pool moments, the MAP forms, the
cut-off; then each row marked. No files: the API (`mapray.api.select`) and the runs (`mapray.pipeline`) both
call `decide` and `mark`.

z-scoring is affine, so the pool needs only count / mean / M2 of m_ex and |m_im| from every block (merged
exactly). map, map_unreg and map_z are all computed here, from the margins and this decision's alpha, so
reselecting with another alpha changes all three. A ratio or top_k rule finds the k-th best row with Ray's
distributed sort; a row is selected when its score beats that row's (score, pair_id), so ties at the boundary are
broken by pair_id and exactly k rows are kept. A threshold rule keeps every row whose score exceeds it.

A pair_id more than one good row carries: when every copy holds the same input row (the pair and the input's
own columns), one copy stays in the pool and the others are set aside as duplicates; when the copies differ, the
id is ambiguous and all of them are set aside (stage "dedupe"). Telling copies apart needs a unique key per row
(`key`: the runs' row key, or one `mapray.api.select` adds).

The passes read public column names (`pair_id`, the margins, `reject_reason`, the key): a run hands `decide` a
narrow projection of its staged rows and the full rows (`full`) only to compare the copies of a duplicated id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mapray import columns as C
from mapray import metrics
from mapray.config import SelectionConfig
from mapray.normalize import raw_json
from mapray.public_rows import good

SCORE = "_m_selection_score"
DEDUPE = "dedupe"
COMPUTED = {*C.SCORED, C.CANDIDATE_REWARDS_OUT, *C.REJECT_COLUMNS} - {C.PAIR_ID}  # not part of a row's content
# the internal columns that are a row's content (its canonical pair); the others are bookkeeping
CONTENT = {C.PROMPT, C.CHOSEN, C.REJECTED, C.CANDIDATES, C.SCORE_CHOSEN, C.SCORE_REJECTED}


@dataclass(frozen=True)
class Selection:
    """What the selection decided: the rule, the pool it was applied to, how many rows it keeps, its cut-off,
    and the copies of duplicated pair_ids it set aside (row key -> reason)."""

    config: SelectionConfig
    alpha: float
    pool: metrics.PoolMoments
    count: int
    cutoff: tuple[float, str] | None = None  # ranking rules: (score, pair_id) of the last kept row
    duplicates: dict[str, str] = field(default_factory=dict, repr=False)

    def keeps(self, scores: np.ndarray, pair_ids: np.ndarray) -> np.ndarray:
        rule, value = self.config.rule
        if rule == "threshold":
            return scores > value
        if self.cutoff is None:
            return np.zeros(len(scores), dtype=bool)
        score, pid = self.cutoff
        return (scores > score) | ((scores == score) & (pair_ids <= pid))

    def summary(self) -> dict:
        """For the manifest and the dataset card: how the selection was made."""
        rule, value = self.config.rule
        out = {"metric": self.config.metric, "alpha": self.alpha, "rule": rule, rule: value, "selected": self.count}
        if self.config.metric == "random":
            out["seed"] = self.config.seed
        if self.cutoff is not None:
            out["cutoff"] = {"score": self.cutoff[0], C.PAIR_ID: self.cutoff[1]}
        return out

    @property
    def scored(self) -> int:
        """Rows in the pool (good rows, duplicates set aside)."""
        return self.pool.explicit.count


def decide(rows, sel: SelectionConfig, alpha: float, key: str | None = None, full=None) -> Selection:
    """The whole decision over `rows` (a Dataset read several times: files or materialized); `key`: the column
    telling rows apart, None when pair_ids are known to be unique (a reselection); `full`: the same rows with
    every column, where `rows` is a narrow projection (module docstring)."""
    duplicates = duplicate_rejects(rows, key, full) if key else {}
    pool_rows = rows.map_batches(partial(_pool, duplicates=duplicates, key=key), batch_format="pyarrow")
    pool = pool_moments(pool_rows)
    rule, value = sel.rule
    score = partial(add_scores, pool=pool, alpha=alpha, sel=sel)
    if rule == "threshold":
        counts = pool_rows.map_batches(partial(_count_above, score=score, threshold=value), batch_format="pyarrow")
        return Selection(sel, alpha, pool, sum(int(r["n"]) for r in counts.take_all()), duplicates=duplicates)
    k = metrics.selection_count(pool.explicit.count, rule, value)
    if k == 0:
        return Selection(sel, alpha, pool, 0, duplicates=duplicates)
    ranked = (pool_rows.map_batches(score, batch_format="pyarrow")
              .select_columns([SCORE, C.PAIR_ID])
              .sort([SCORE, C.PAIR_ID], descending=[True, False])
              .limit(k))
    last = None
    for batch in ranked.iter_batches(batch_format="pyarrow", batch_size=65536):
        last = batch.slice(batch.num_rows - 1).to_pylist()[0] if batch.num_rows else last
    return Selection(sel, alpha, pool, k, (last[SCORE], last[C.PAIR_ID]), duplicates)


def mark(table: pa.Table, selection: Selection, key: str | None = None) -> pa.Table:
    """A block of public rows with the decision applied: the copies of duplicated pair_ids set aside (`set_aside`,
    by `key`; without one, rows set aside already), the MAP forms and `selected` on the pool's rows (null forms and
    not selected on the rows set aside)."""
    if selection.duplicates and key is not None:
        table = set_aside(table, selection.duplicates, key)
    in_pool = (pc.is_null(table.column(C.REJECT_REASON)).to_numpy(zero_copy_only=False)
               if C.REJECT_REASON in table.column_names else np.ones(table.num_rows, dtype=bool))
    table = add_scores(table, selection.pool, selection.alpha, selection.config, mask=~in_pool)
    pool_rows = np.flatnonzero(in_pool)  # a row set aside may have no pair_id to compare
    ids = np.array(table.column(C.PAIR_ID).take(pool_rows).to_pylist(), dtype=object)
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[pool_rows] = selection.keeps(_numpy(table, SCORE)[pool_rows], ids)
    return C.set_column(table, C.SELECTED, keep, pa.bool_()).drop_columns([SCORE])


def duplicate_rejects(rows, key: str, full=None) -> dict[str, str]:
    """{row key: reason} for the copies of pair_ids that more than one good row carries (module docstring)."""
    from ray.data.expressions import col

    # Ray's default is 200 hash partitions (an aggregator each): ~25 s of fixed cost on a small pool. One
    # partition per ~250k rows keeps large pools parallel and small ones cheap.
    partitions = max(1, min(200, rows.count() // 250_000 + 1))
    counts = rows.map_batches(good, batch_format="pyarrow").select_columns([C.PAIR_ID]).groupby(
        C.PAIR_ID, num_partitions=partitions).count()
    dups = {r[C.PAIR_ID] for r in counts.filter(expr=col("count()") > 1).iter_rows()}
    if not dups:
        return {}
    copies: dict[str, list[dict]] = {}
    for row in (full or rows).map_batches(partial(_with_ids, ids=dups), batch_format="pyarrow").iter_rows():
        copies.setdefault(row[C.PAIR_ID], []).append(row)
    reasons = {}
    for group in copies.values():
        group.sort(key=lambda r: r[key])
        content = content_columns(group[0], key)
        if all([r[c] for c in content] == [group[0][c] for c in content] for r in group):
            reasons.update({r[key]: "duplicate pair_id: an identical copy of a scored row" for r in group[1:]})
        else:
            reasons.update({r[key]: f"duplicate pair_id: {len(group)} rows with different content share it"
                            for r in group})
    return reasons


def content_columns(names, key: str | None) -> list[str]:
    """The columns that make a row what it is: the pair and the input's own columns (public or internal rows),
    not what mapray computed or keeps for its own bookkeeping."""
    return [c for c in names if c not in COMPUTED and c != key
            and (not c.startswith(C.INTERNAL_PREFIX) or c in CONTENT)]


def _with_ids(table: pa.Table, ids: set[str]) -> pa.Table:
    rows = good(table)
    return rows.filter(pc.is_in(rows.column(C.PAIR_ID), value_set=pa.array(sorted(ids), pa.string())))


def set_aside(table: pa.Table, reasons: dict[str, str], key: str) -> pa.Table:
    """The copies of duplicated pair_ids in a block set aside (stage "dedupe"), public or internal rows. A public
    row keeps the row it was given as its raw (an internal row gets the input row's when it becomes public)."""
    keys = table.column(key).to_pylist()
    internal = C.REJECT in table.column_names
    reason_col, stage_col = (C.REJECT, C.REJECT_STAGE) if internal else (C.REJECT_REASON, C.REJECT_PREFIX + C.STAGE)
    reason, stage = table.column(reason_col).to_pylist(), table.column(stage_col).to_pylist()
    hit = [i for i, k in enumerate(keys) if k in reasons and reason[i] is None]
    if not hit:
        return table
    for i in hit:
        reason[i], stage[i] = reasons[keys[i]], DEDUPE
    table = C.set_column(C.set_column(table, reason_col, reason, pa.string()), stage_col, stage, pa.string())
    if internal:
        return table
    raw_col = C.REJECT_PREFIX + C.RAW_OUT
    raw = table.column(raw_col).to_pylist()
    content = table.select(content_columns(table.column_names, key))
    for i in hit:
        raw[i] = raw_json(content.slice(i, 1).to_pylist()[0])
    return C.set_column(table, raw_col, raw, pa.string())


def _pool(table: pa.Table, duplicates: dict[str, str], key: str | None) -> pa.Table:
    rows = good(table)
    if duplicates:
        rows = rows.filter(pc.invert(pc.is_in(rows.column(key), value_set=pa.array(list(duplicates), pa.string()))))
    return rows


def _block_moments(table: pa.Table) -> pa.Table:
    m = metrics.PoolMoments.of(_numpy(table, C.EXPLICIT_MARGIN), _numpy(table, C.IMPLICIT_MARGIN))
    return pa.table({"n": [m.explicit.count], "ex_mean": [m.explicit.mean], "ex_m2": [m.explicit.m2],
                     "im_mean": [m.implicit_abs.mean], "im_m2": [m.implicit_abs.m2]})


def pool_moments(pool_rows) -> metrics.PoolMoments:
    pool = metrics.PoolMoments(metrics.Moments(), metrics.Moments())
    for row in pool_rows.map_batches(_block_moments, batch_format="pyarrow").take_all():
        n = int(row["n"])
        pool = pool.merge(metrics.PoolMoments(metrics.Moments(n, row["ex_mean"], row["ex_m2"]),
                                              metrics.Moments(n, row["im_mean"], row["im_m2"])))
    return pool


def add_scores(table: pa.Table, pool: metrics.PoolMoments, alpha: float, sel: SelectionConfig,
               mask: np.ndarray | None = None) -> pa.Table:
    """Adds map, map_unreg and map_z (the only place alpha reaches them) and the selection score (an internal
    column) to a block of rows; `mask`: rows outside the pool, whose MAP forms are null."""
    m_ex, m_im = _numpy(table, C.EXPLICIT_MARGIN), _numpy(table, C.IMPLICIT_MARGIN)
    with np.errstate(all="ignore"):  # rows outside the pool hold nulls (NaN here)
        cols = metrics.map_forms(m_ex, m_im, alpha, pool)
    for name, values in cols.items():
        table = C.set_column(table, name, pa.array(values, pa.float64(), mask=mask), pa.float64())
    cols.update({C.EXPLICIT_MARGIN: m_ex, C.IMPLICIT_MARGIN: m_im, C.PAIR_ID: table.column(C.PAIR_ID).to_pylist()})
    return C.set_column(table, SCORE, metrics.selection_score(sel.metric, cols, sel.seed), pa.float64())


def _count_above(table: pa.Table, score, threshold: float) -> pa.Table:
    return pa.table({"n": [int((_numpy(score(table), SCORE) > threshold).sum())]})


def only_selected(table: pa.Table) -> pa.Table:
    return table.filter(table.column(C.SELECTED))


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
