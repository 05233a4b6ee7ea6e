"""The global pass: pool moments, the MAP forms and the selection over the whole scored pool, not per block.

z-scoring is affine, so the pool needs only count / mean / M2 of m_ex and |m_im| from every block (merged
exactly). map, map_unreg and map_z are all computed here, from the margins and this pass's alpha, so reselecting
with another alpha changes all three. A ratio or top_k rule finds the k-th best row with Ray's distributed sort;
a row is selected when its score beats that row's (score, pair_id), so ties at the boundary are broken by pair_id
and exactly k rows are kept. A threshold rule keeps every row whose score exceeds it and needs no sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from mapray import columns as C
from mapray import metrics
from mapray.config import SelectionConfig

SCORE = "_m_selection_score"


@dataclass(frozen=True)
class Selection:
    """What the global pass decided: the rule, the pool it was applied to, and how many rows it keeps."""

    config: SelectionConfig
    alpha: float
    pool: metrics.PoolMoments
    count: int
    cutoff: tuple[float, str] | None = None  # ranking rules: (score, pair_id) of the last kept row

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


def only_good(table: pa.Table) -> pa.Table:
    return table.filter(pa.compute.is_null(table.column(C.REJECT)))


def only_rejected(table: pa.Table) -> pa.Table:
    return table.filter(pa.compute.is_valid(table.column(C.REJECT)))


def duplicate_rejects(rows) -> dict[str, str]:
    """The documented policy for a pair_id that more than one good row carries: when every copy holds the same
    pair (prompt, responses, scores), one copy is scored and the others are set aside as duplicates; when the
    copies differ, the id is ambiguous and all of them are set aside. Returns {row key: reason}."""
    # Ray's default is 200 hash partitions (an aggregator each): ~25 s of fixed cost on a small pool. One
    # partition per ~250k rows keeps large pools parallel and small ones cheap.
    partitions = max(1, min(200, rows.count() // 250_000 + 1))
    counts = rows.map_batches(only_good, batch_format="pyarrow").select_columns([C.PAIR_ID]).groupby(
        C.PAIR_ID, num_partitions=partitions).count()
    dups = {r[C.PAIR_ID] for r in counts.filter(lambda r: r["count()"] > 1).iter_rows()}
    if not dups:
        return {}
    content = [C.PROMPT, C.CHOSEN, C.REJECTED, C.CANDIDATES, C.SCORE_CHOSEN, C.SCORE_REJECTED]
    copies: dict[str, list[dict]] = {}
    for row in rows.map_batches(partial(_with_ids, ids=dups), batch_format="pyarrow").select_columns(
            [C.PAIR_ID, C.ROW, *content]).iter_rows():
        copies.setdefault(row[C.PAIR_ID], []).append(row)
    reasons = {}
    for group in copies.values():
        group.sort(key=lambda r: r[C.ROW])
        if all([r[c] for c in content] == [group[0][c] for c in content] for r in group):
            reasons.update({r[C.ROW]: "duplicate pair_id: an identical copy of a scored row" for r in group[1:]})
        else:
            reasons.update({r[C.ROW]: f"duplicate pair_id: {len(group)} rows with different content share it"
                            for r in group})
    return reasons


def _with_ids(table: pa.Table, ids: set[str]) -> pa.Table:
    good = only_good(table)
    return good.filter(pa.compute.is_in(good.column(C.PAIR_ID), value_set=pa.array(sorted(ids), pa.string())))


def reject_rows_by_key(table: pa.Table, reasons: dict[str, str], stage: str) -> pa.Table:
    keys = table.column(C.ROW).to_pylist()
    return C.mark_rejected(table, {i: reasons[k] for i, k in enumerate(keys) if k in reasons}, stage)


def only_selected(table: pa.Table) -> pa.Table:
    return table.filter(table.column("selected"))


def _block_moments(table: pa.Table) -> pa.Table:
    m = metrics.PoolMoments.of(_numpy(table, "explicit_margin"), _numpy(table, "implicit_margin"))
    return pa.table({"n": [m.explicit.count], "ex_mean": [m.explicit.mean], "ex_m2": [m.explicit.m2],
                     "im_mean": [m.implicit_abs.mean], "im_m2": [m.implicit_abs.m2]})


def pool_moments(good) -> metrics.PoolMoments:
    pool = metrics.PoolMoments(metrics.Moments(), metrics.Moments())
    for row in good.map_batches(_block_moments, batch_format="pyarrow").take_all():
        n = int(row["n"])
        pool = pool.merge(metrics.PoolMoments(metrics.Moments(n, row["ex_mean"], row["ex_m2"]),
                                              metrics.Moments(n, row["im_mean"], row["im_m2"])))
    return pool


def add_scores(table: pa.Table, pool: metrics.PoolMoments, alpha: float, sel: SelectionConfig) -> pa.Table:
    """Adds map, map_unreg and map_z (the only place alpha reaches them) and the selection score (an internal
    column) to a block of good rows."""
    m_ex, m_im = _numpy(table, "explicit_margin"), _numpy(table, "implicit_margin")
    cols = metrics.map_forms(m_ex, m_im, alpha, pool)
    for name, values in cols.items():
        table = C.set_column(table, name, values, pa.float64())
    cols.update(explicit_margin=m_ex, implicit_margin=m_im, pair_id=table.column(C.PAIR_ID).to_pylist())
    return C.set_column(table, SCORE, metrics.selection_score(sel.metric, cols, sel.seed), pa.float64())


def decide(good, pool: metrics.PoolMoments, alpha: float, sel: SelectionConfig) -> Selection:
    """Applies the selection rule to the whole pool: a threshold only counts the rows above it; a ranking rule
    finds its cutoff row with Ray's distributed sort."""
    rule, value = sel.rule
    score = partial(add_scores, pool=pool, alpha=alpha, sel=sel)
    if rule == "threshold":
        counts = good.map_batches(partial(_count_above, score=score, threshold=value), batch_format="pyarrow")
        return Selection(sel, alpha, pool, sum(int(r["n"]) for r in counts.take_all()))
    k = metrics.selection_count(pool.explicit.count, rule, value)
    if k == 0:
        return Selection(sel, alpha, pool, 0)
    ranked = (good.map_batches(score, batch_format="pyarrow")
              .select_columns([SCORE, C.PAIR_ID])
              .sort([SCORE, C.PAIR_ID], descending=[True, False])
              .limit(k))
    last = None
    for batch in ranked.iter_batches(batch_format="pyarrow", batch_size=65536):
        last = batch.slice(batch.num_rows - 1).to_pylist()[0] if batch.num_rows else last
    return Selection(sel, alpha, pool, k, (last[SCORE], last[C.PAIR_ID]))


def _count_above(table: pa.Table, score, threshold: float) -> pa.Table:
    return pa.table({"n": [int((_numpy(score(table), SCORE) > threshold).sum())]})


def mark_selected(table: pa.Table, selection: Selection) -> pa.Table:
    table = add_scores(table, selection.pool, selection.alpha, selection.config)
    ids = np.array(table.column(C.PAIR_ID).to_pylist(), dtype=object)
    table = C.set_column(table, "selected", selection.keeps(_numpy(table, SCORE), ids), pa.bool_())
    return table.drop_columns([SCORE])


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
