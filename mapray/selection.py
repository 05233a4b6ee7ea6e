"""The selection decision over a whole scored pool: duplicates, pool moments, the MAP forms, the cut-off; then each
row marked. No files: the API (`mapray.api.select`) and the runs (`mapray.pipeline`) both call `decide` and `mark`.

In as few passes over the rows as the pool allows (each a Ray Data execution whose result is small):
1. one pass: each block's moments of m_ex and |m_im| (count / mean / M2, merged exactly: z-scoring is affine, so
   that is all map_z needs), a sample of its rows (bottom-k by a hash of pair_id), and the hashes of its pair_ids,
   merged by one task on a worker that reports only the hashes seen twice. When the pool is no larger than the
   sample (`SAMPLE_ROWS`), the sample is the pool and the cut-off is found right there: one pass in all.
2. a larger pool: one pass over the window of scores the sample predicts for the k-th best row (+-6 standard
   errors of a sampled rank): the rows above it counted, the window's rows to the driver, sorted, exact. Where the
   window would be too large (a heavy tie) or misses the k-th row: its scores counted on `RANK_BINS` bins at
   quantiles of the sample's scores, then the rows of the bin that holds the k-th row (about pool / RANK_BINS)
   sorted on the driver, or, a bin too large for that, by Ray's distributed sort.
A row is selected when its score beats the k-th row's (score, pair_id), so ties at the boundary are broken by
pair_id and exactly k rows are kept. Per-group selection (`selection.by`, `mapray.groups`) runs the same passes
per group: the first pass also takes each group's moments, the window pass collects every group's window at once,
and a group its window cannot decide goes through Ray's sort of its rows.
A threshold rule keeps every row whose score exceeds it (counted in one pass, or on the sample). map, map_unreg
and map_z are all computed from the margins and this decision's alpha, so
reselecting with another alpha changes all three.

A pair_id more than one good row carries: when every copy holds the same input row (the pair and the input's
own columns), one copy stays in the pool and the others are set aside as duplicates; when the copies differ, the
id is ambiguous and all of them are set aside (stage "dedupe"). Telling copies apart needs a unique key per row
(`key`: the runs' row key, or one `mapray.api.select` adds). The pool's moments are then taken again without the
copies (one more pass, only when there are any).

The passes read public column names (`pair_id`, the margins, the reason a row was set aside, the key): a run hands
`decide` a narrow projection of its staged rows and the full rows (`full`) only to compare the copies of a
duplicated id.

(Over 400 lines: the passes, the scores they rank and the marking that applies their decision are one algorithm,
read together, pool-wide and per group; the duplicates live in `mapray.duplicates`, the histogram arithmetic in
`mapray.histograms`, the groups' rules in `mapray.groups`.)
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mapray import columns as C
from mapray import histograms, metrics
from mapray.config import SelectionConfig
from mapray.duplicates import duplicate_rejects, hashes, set_aside
from mapray.groups import (
    Group,
    GroupRule,
    absent_quotas,
    check_group_count,
    keeps_above,
    moments_by_group,
    rows_by_group,
)
from mapray.public_rows import good
from mapray.reductions import BATCH_ROWS, kth_best, merge, reduce

SCORE = "_m_selection_score"
HASH = "_m_hash"  # a sample row's hash of pair_id (`mapray.duplicates.hashes`)
SAMPLE_ROWS = 32_768  # pool rows the first pass brings to the driver: the whole pool when it is this small
RANK_BINS = 2048  # a cut-off bin holds about pool / RANK_BINS rows


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
    groups: dict | None = None  # per-group selection (`config.by`): each group's value -> its `Group`

    def keeps(self, scores: np.ndarray, pair_ids: pa.Array, group_column=None) -> np.ndarray:
        """Which of these pool rows are kept; `pair_ids`: theirs, an Arrow array; `group_column`: their values of
        `config.by` (per-group)."""
        if self.groups is not None:
            keep = np.zeros(len(scores), dtype=bool)
            for value, at in rows_by_group(group_column).items():
                keep[at] = self.groups[value].keeps(scores[at], pair_ids.take(pa.array(at, pa.int64())))
            return keep
        rule, value = self.config.rule
        if rule == "threshold":
            return scores > value
        return keeps_above(self.cutoff, scores, pair_ids)

    @property
    def warnings(self) -> list[str]:
        """What a user should hear about the decision: quotas naming a group the pool does not have."""
        if self.groups is None:
            return []
        return [f"selection.quotas names {name!r}, which no row of the pool has in column {self.config.by!r}"
                for name in absent_quotas(self.config, self.groups)]

    @property
    def group_pools(self) -> dict | None:
        """Each group's moments where map_z is z-scored within groups (`zscore: group`), else None."""
        if self.groups is None or self.config.zscore != "group":
            return None
        return {value: group.pool for value, group in self.groups.items()}

    def summary(self) -> dict:
        """For the manifest and the dataset card: how the selection was made."""
        rule, value = self.config.rule
        out = {"metric": self.config.metric, "alpha": self.alpha, "rule": rule, rule: value, "selected": self.count}
        if self.config.metric == "random":
            out["seed"] = self.config.seed
        if self.cutoff is not None:
            out["cutoff"] = {"score": self.cutoff[0], C.PAIR_ID: self.cutoff[1]}
        if self.groups is not None:
            ordered = sorted(self.groups.values(), key=lambda g: (-g.size, str(g.value)))  # the largest first
            out.update(by=self.config.by, zscore=self.config.zscore, quotas=dict(self.config.quotas),
                       groups=[g.summary() for g in ordered])
        return out

    @property
    def scored(self) -> int:
        """Rows in the pool (good rows, duplicates set aside)."""
        return self.pool.explicit.count


def decide(rows, sel: SelectionConfig, alpha: float, key: str | None = None, full=None,
           sample_rows: int = SAMPLE_ROWS, bins: int = RANK_BINS) -> Selection:
    """The whole decision over `rows` (a Dataset read a few times: files or materialized); `key`: the column
    telling rows apart, None when pair_ids are known to be unique (a reselection); `full`: the same rows with
    every column, where `rows` is a narrow projection; `sample_rows`, `bins`: the first pass's sample and the
    histogram's bins (module docstring)."""
    first = _first_pass(rows, key, sample_rows, sel.by)
    duplicates = {}
    if first.repeated.size:
        duplicates = duplicate_rejects(full or rows, key, first.repeated)
    pool, sample, groups = first.pool, first.sample, first.groups
    if duplicates:  # the copies set aside leave the pool: its moments again, without them
        sample = sample.filter(pc.invert(pc.is_in(sample.column(key), value_set=_keys(duplicates))))
        again = reduce(rows, _moments, duplicates=duplicates, key=key, by=sel.by) or {}
        pool, groups = again.get("pool", _empty_moments()), again.get("groups", {})
    if sel.by is not None:
        return _decide_groups(rows, sel, alpha, pool, groups, sample, first.whole_pool, duplicates, key)
    rule, value = sel.rule
    k = metrics.selection_count(pool.explicit.count, rule, value) if rule != "threshold" else None
    if k == 0:
        return Selection(sel, alpha, pool, 0, duplicates=duplicates)
    scores = _score(sample, pool, alpha, sel)
    if first.whole_pool:  # every pool row is in the sample: decided here, exactly
        if rule == "threshold":
            return Selection(sel, alpha, pool, int((scores > value).sum()), duplicates=duplicates)
        return Selection(sel, alpha, pool, k, _kth(scores, sample.column(C.PAIR_ID), k), duplicates)
    scoring = {"pool": pool, "alpha": alpha, "sel": sel, "duplicates": duplicates, "key": key}
    if rule == "threshold":
        above = reduce(rows, _count_above, threshold=value, **scoring) or 0
        return Selection(sel, alpha, pool, above, duplicates=duplicates)
    cutoff = _cutoff_from_window(rows, scores, pool.explicit.count, k, scoring)
    if cutoff is not None:
        return Selection(sel, alpha, pool, k, cutoff, duplicates)
    edges = histograms.rank_edges(scores, bins)
    top = histograms.top_bin(reduce(rows, _bin_counts, edges=edges, **scoring), k)
    lo, hi = histograms.bin_bounds(edges, top.bin)
    if top.size <= histograms.COLLECT_LIMIT:
        in_bin = reduce(rows, _in_bin, lo=lo, hi=hi, **scoring)
        cutoff = _kth(_numpy(in_bin, SCORE), in_bin.column(C.PAIR_ID), top.keep)
    else:  # a heavy tie: the bin's rows through Ray's sort
        last = kth_best(rows.map_batches(partial(_in_bin, lo=lo, hi=hi, **scoring), batch_format="pyarrow"),
                        [SCORE, C.PAIR_ID], top.keep)
        cutoff = (last[SCORE], last[C.PAIR_ID])
    return Selection(sel, alpha, pool, k, cutoff, duplicates)


WINDOW_SIGMAS = 6.0  # how far around the sample's estimate of the cut-off's rank the window reaches


def _cutoff_from_window(rows, sample_scores: np.ndarray, n: int, k: int, scoring: dict) -> tuple[float, str] | None:
    """The k-th best row in one pass, where the sample predicts it well: the sample's scores around rank k give a
    score window [lo, hi] (`_window_bounds`); the pass counts the pool's rows above hi and brings the window's rows
    to the driver. When the k-th row lies in the window, it is exact (`_cutoff_in`); otherwise, or when the window
    would be too large to collect (a heavy tie at the boundary shows in the sample), None: the histogram passes
    decide."""
    lo, hi, size = _window_bounds(sample_scores, n, k)
    if size > histograms.COLLECT_LIMIT / 2:
        return None
    return _cutoff_in(reduce(rows, _window, lo=lo, hi=hi, limit=histograms.COLLECT_LIMIT, **scoring), k)


def _window_bounds(sample_scores: np.ndarray, n: int, k: int) -> tuple[float, float, float]:
    """The score window [lo, hi] that holds the k-th best of n rows, from a uniform sample of their scores: the
    sample's scores at rank k/n of it +- `WINDOW_SIGMAS` standard errors of a sampled rank; and the rows of the
    n it should hold. No sample: every row."""
    s = sample_scores.size
    if s == 0:
        return -np.inf, np.inf, float(n)
    ranked = np.sort(sample_scores)[::-1]
    p = k / n
    margin = WINDOW_SIGMAS * np.sqrt(s * p * (1 - p)) + 2
    at = k / n * s
    first, last = min(int(np.floor(at - margin)), s - 1), int(np.ceil(at + margin))
    hi = float(ranked[first]) if first >= 0 else np.inf
    lo = float(ranked[last]) if last < s else -np.inf
    return lo, hi, int(((sample_scores >= lo) & (sample_scores <= hi)).sum()) * n / s


def _cutoff_in(found: dict | None, k: int) -> tuple[float, str] | None:
    """The k-th best row from a window pass's count above the window and its rows; None when it is not among
    them (the window overflowed, or the sample misled: about one pool in 10^8 at 6 sigma)."""
    if found is None or found["overflow"]:
        return None
    window = found["rows"]
    if not found["above"] < k <= found["above"] + window.num_rows:
        return None
    return _kth(_numpy(window, SCORE), window.column(C.PAIR_ID), k - found["above"])


def _window(table: pa.Table, lo: float, hi: float, limit: int, **scoring) -> dict:
    rows, scores = _pool_scores(table, **scoring)
    return _window_part(scores, rows.column(C.PAIR_ID), lo, hi, limit)


def _window_part(scores: np.ndarray, pair_ids, lo: float, hi: float, limit: int) -> dict:
    """Rows scoring above `hi` (counted) and within [lo, hi] (as (score, pair_id), unless more than `limit`:
    then only the overflow is reported)."""
    inside = np.flatnonzero((scores >= lo) & (scores <= hi))
    part = pa.table({SCORE: scores[inside], C.PAIR_ID: pair_ids.take(pa.array(inside, pa.int64()))})
    overflow = inside.size > limit
    return {"above": int((scores > hi).sum()), "overflow": overflow, "rows": part.slice(0, 0) if overflow else part}


def _decide_groups(rows, sel: SelectionConfig, alpha: float, pool, pools: dict, sample: pa.Table,
                   whole_pool: bool, duplicates: dict, key: str | None) -> Selection:
    """Per-group selection (`mapray.groups`): each group's rule applied to its rows. The sample's rows of a group
    decide it when the sample is the pool; otherwise one pass counts each threshold group's rows above its
    threshold and collects each ranking group's window (`_window_bounds` from the group's sample rows; as many
    groups a pass as `COLLECT_LIMIT` / 2 rows of windows allow, one pass for a mixture's few groups), and a group
    the window cannot decide (too large, a heavy tie, a sample that misled) gets its k-th row by Ray's sort of its
    rows."""
    check_group_count(pools, sel.by)
    group_pools = pools if sel.zscore == "group" else None
    scoring = {"pool": pool, "alpha": alpha, "sel": sel, "duplicates": duplicates, "key": key,
               "group_pools": group_pools}
    scores = _score(sample, pool, alpha, sel, group_pools)
    in_sample = rows_by_group(sample.column(sel.by)) if sample.num_rows else {}
    rules = {value: GroupRule.of(sel, value, moments.explicit.count) for value, moments in pools.items()}
    decided, windows, thresholds, sorts = {}, {}, {}, []
    for value, rule in rules.items():
        at = in_sample.get(value, np.zeros(0, np.int64))
        n = pools[value].explicit.count
        if rule.keep == 0 or rule.keep == n:
            decided[value] = rule.keep, None
        elif whole_pool and rule.keep is None:
            decided[value] = int((scores[at] > rule.value).sum()), None
        elif whole_pool:
            decided[value] = rule.keep, _kth(scores[at], sample.column(C.PAIR_ID).take(at), rule.keep)
        elif rule.keep is None:
            thresholds[value] = rule.value
        else:
            windows[value] = _window_bounds(scores[at], n, rule.keep)
    # the windows in passes of at most COLLECT_LIMIT / 2 rows each, the smallest first: one pass for a mixture's
    # few groups; a window larger than that alone goes through Ray's sort
    budget, batches = histograms.COLLECT_LIMIT / 2, [[]]
    room = budget
    for value in sorted(windows, key=lambda v: windows[v][2]):
        size = windows[value][2]
        if size > budget:
            sorts.append(value)
            continue
        if size > room:
            batches.append([])
            room = budget
        batches[-1].append(value)
        room -= size
    for i, batch in enumerate(batches):
        if not batch and (i or not thresholds):
            continue
        found = reduce(rows, _group_windows, windows={v: windows[v][:2] for v in batch},
                       thresholds=thresholds if i == 0 else {}, limit=histograms.COLLECT_LIMIT, **scoring) or {}
        for value in thresholds if i == 0 else ():
            decided[value] = found.get(value, {}).get("above", 0), None
        for value in batch:
            cutoff = _cutoff_in(found.get(value), rules[value].keep)
            if cutoff is None:
                sorts.append(value)
            else:
                decided[value] = rules[value].keep, cutoff
    for value in sorts:  # a heavy tie or a misleading sample: the group's rows through Ray's sort
        last = kth_best(rows.map_batches(partial(_group_scores, value=value, **scoring), batch_format="pyarrow"),
                        [SCORE, C.PAIR_ID], rules[value].keep)
        decided[value] = rules[value].keep, (last[SCORE], last[C.PAIR_ID])
    groups = {value: Group(value, pools[value], rules[value], count, cutoff)
              for value, (count, cutoff) in decided.items()}
    return Selection(sel, alpha, pool, sum(g.count for g in groups.values()), duplicates=duplicates, groups=groups)


def _group_windows(table: pa.Table, windows: dict, thresholds: dict, limit: int, **scoring) -> dict:
    """A block's part of each group's window (`_window_part`) and of each threshold group's count above it."""
    rows, scores = _pool_scores(table, **scoring)
    out = {}
    for value, at in rows_by_group(rows.column(scoring["sel"].by)).items():
        if value in windows:
            out[value] = _window_part(scores[at], rows.column(C.PAIR_ID).take(at), *windows[value], limit)
        elif value in thresholds:
            out[value] = {"above": int((scores[at] > thresholds[value]).sum())}
    return out


def _group_scores(table: pa.Table, value, **scoring) -> pa.Table:
    """A block's rows of one group: (score, pair_id)."""
    rows, scores = _pool_scores(table, **scoring)
    at = rows_by_group(rows.column(scoring["sel"].by)).get(value, np.zeros(0, np.int64))
    return pa.table({SCORE: scores[at], C.PAIR_ID: rows.column(C.PAIR_ID).take(at)})


@dataclass(frozen=True)
class FirstPass:
    """What one pass over the rows tells: the pool's moments (copies of duplicated ids included), a sample of its
    rows (bottom-k by a hash of pair_id: uniform, the same however the pool is split), whether the sample is the
    whole pool, and the pair_id hashes more than one good row carries."""

    pool: metrics.PoolMoments
    sample: pa.Table
    whole_pool: bool
    repeated: np.ndarray
    groups: dict | None = None  # per-group selection: each group's value -> its moments


def _first_pass(rows, key: str | None, sample_rows: int, by: str | None = None) -> FirstPass:
    """One Ray Data execution: each block's moments (per group too, with `by`), its bottom-k sample and (with a
    key) its pair_id hashes, merged by one task on a worker, so the hashes (8 bytes a row) never come to the
    driver."""
    summaries = rows.map_batches(partial(_summarize, key=key, sample_rows=sample_rows, by=by),
                                 batch_format="pyarrow", batch_size=BATCH_ROWS)
    merged = summaries.repartition(1).map_batches(partial(_merge_summaries, sample_rows=sample_rows),
                                                  batch_format="pyarrow", batch_size=None)
    blobs = [row["blob"] for row in merged.iter_rows()]
    if not blobs:  # no rows at all
        schema = pa.schema([(c, pa.float64() if c in (C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN) else pa.string())
                            for c in _sample_columns(key) + ([by] if by else [])])
        return FirstPass(_empty_moments(), schema.empty_table(), True, np.zeros(0, np.uint64), {} if by else None)
    return pickle.loads(blobs[0])


def _summarize(table: pa.Table, key: str | None, sample_rows: int, by: str | None) -> pa.Table:
    rows = good(table)
    ids = hashes(rows.column(C.PAIR_ID))
    columns = _sample_columns(key) + ([by] if by else [])
    sample = _bottom(rows.select(columns).append_column(HASH, pa.array(ids)), sample_rows)
    part = {"pool": metrics.PoolMoments.of(_numpy(rows, C.EXPLICIT_MARGIN), _numpy(rows, C.IMPLICIT_MARGIN)),
            "sample": sample, "rows": rows.num_rows, "groups": moments_by_group(rows, by) if by else None}
    return pa.table({"blob": [pickle.dumps(part)],
                     "hashes": [np.sort(ids).tobytes() if key is not None else b""]},
                    schema=pa.schema([("blob", pa.binary()), ("hashes", pa.large_binary())]))


def _merge_summaries(table: pa.Table, sample_rows: int) -> pa.Table:
    if table.num_rows == 0:
        return pa.table({"blob": pa.array([], pa.binary())})
    parts = [pickle.loads(b) for b in table.column("blob").to_pylist()]
    pool, groups = _empty_moments(), None
    for part in parts:
        pool, groups = pool.merge(part["pool"]), merge(groups, part["groups"])
    sample = _bottom(pa.concat_tables([p["sample"] for p in parts]), sample_rows)
    ids = np.concatenate([np.frombuffer(b, dtype=np.uint64) for b in table.column("hashes").to_pylist()])
    values, counts = np.unique(ids, return_counts=True)
    whole = sum(p["rows"] for p in parts) <= sample_rows
    first = FirstPass(pool, sample.drop_columns([HASH]), whole, values[counts > 1], groups)
    return pa.table({"blob": [pickle.dumps(first)]})


def _bottom(table: pa.Table, k: int) -> pa.Table:
    """The k rows with the smallest hashes (ties by pair_id), sorted."""
    if table.num_rows > 2 * k:  # only the candidates are sorted
        ids = table.column(HASH).to_numpy()
        table = table.take(pa.array(np.flatnonzero(ids <= np.partition(ids, k)[k]), pa.int64()))
    return table.sort_by([(HASH, "ascending"), (C.PAIR_ID, "ascending")]).slice(0, k)


def _sample_columns(key: str | None) -> list[str]:
    return [C.PAIR_ID, C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN] + ([key] if key is not None else [])


def _empty_moments() -> metrics.PoolMoments:
    return metrics.PoolMoments(metrics.Moments(), metrics.Moments())


def _keys(duplicates: dict[str, str]) -> pa.Array:
    return pa.array(list(duplicates), pa.string())


def _score(table: pa.Table, pool, alpha: float, sel: SelectionConfig, group_pools: dict | None = None) -> np.ndarray:
    return _numpy(add_scores(table, pool, alpha, sel, group_pools=group_pools), SCORE)


def _kth(scores: np.ndarray, pair_ids, k: int) -> tuple[float, str]:
    """(score, pair_id) of the k-th best row: score descending, ties by the smaller pair_id."""
    ranked = pa.table({SCORE: scores, C.PAIR_ID: pair_ids}).sort_by([(SCORE, "descending"), (C.PAIR_ID, "ascending")])
    last = ranked.slice(k - 1, 1).to_pylist()[0]
    return last[SCORE], last[C.PAIR_ID]


def _pool_scores(table: pa.Table, pool, alpha, sel, duplicates, key, group_pools=None) -> tuple[pa.Table, np.ndarray]:
    rows = _pool(table, duplicates, key)
    return rows, _score(rows, pool, alpha, sel, group_pools)


def _moments(table: pa.Table, duplicates: dict[str, str], key: str, by: str | None) -> dict:
    rows = _pool(table, duplicates, key)
    return {"pool": metrics.PoolMoments.of(_numpy(rows, C.EXPLICIT_MARGIN), _numpy(rows, C.IMPLICIT_MARGIN)),
            "groups": moments_by_group(rows, by) if by else None}


def _count_above(table: pa.Table, threshold: float, **scoring) -> int:
    return int((_pool_scores(table, **scoring)[1] > threshold).sum())


def _bin_counts(table: pa.Table, edges: np.ndarray, **scoring) -> np.ndarray:
    return histograms.bin_counts(_pool_scores(table, **scoring)[1], edges)


def _in_bin(table: pa.Table, lo: float, hi: float, **scoring) -> pa.Table:
    """The pool rows whose score lies in [lo, hi): (score, pair_id)."""
    rows, scores = _pool_scores(table, **scoring)
    where = np.flatnonzero((scores >= lo) & (scores < hi))
    return pa.table({SCORE: scores[where], C.PAIR_ID: rows.column(C.PAIR_ID).take(pa.array(where, pa.int64()))})


def mark(table: pa.Table, selection: Selection, key: str | None = None) -> pa.Table:
    """A block of public rows with the decision applied: the copies of duplicated pair_ids set aside (`set_aside`,
    by `key`; without one, rows set aside already), the MAP forms and `selected` on the pool's rows (null forms and
    not selected on the rows set aside)."""
    if selection.duplicates and key is not None:
        table = set_aside(table, selection.duplicates, key)
    in_pool = (pc.is_null(table.column(C.REJECT_REASON)).to_numpy(zero_copy_only=False)
               if C.REJECT_REASON in table.column_names else np.ones(table.num_rows, dtype=bool))
    table = add_scores(table, selection.pool, selection.alpha, selection.config, mask=~in_pool,
                       group_pools=selection.group_pools)
    pool_rows = np.flatnonzero(in_pool)  # a row set aside may have no pair_id to compare
    ids = table.column(C.PAIR_ID).take(pa.array(pool_rows, pa.int64()))
    keep = np.zeros(table.num_rows, dtype=bool)
    groups = table.column(selection.config.by).take(pool_rows) if selection.groups is not None else None
    keep[pool_rows] = selection.keeps(_numpy(table, SCORE)[pool_rows], ids, groups)
    return C.set_column(table, C.SELECTED, keep, pa.bool_()).drop_columns([SCORE])


def _pool(table: pa.Table, duplicates: dict[str, str], key: str | None) -> pa.Table:
    """A block's rows in the pool: good, and not a copy of a duplicated pair_id set aside."""
    rows = good(table)
    if duplicates:
        rows = rows.filter(pc.invert(pc.is_in(rows.column(key), value_set=_keys(duplicates))))
    return rows


def add_scores(table: pa.Table, pool: metrics.PoolMoments, alpha: float, sel: SelectionConfig,
               mask: np.ndarray | None = None, group_pools: dict | None = None) -> pa.Table:
    """Adds map, map_unreg and map_z (the only place alpha reaches them) and the selection score (an internal
    column) to a block of rows; `mask`: rows outside the pool, whose MAP forms are null; `group_pools`: each
    group's moments, where map_z is z-scored within groups (a row of a group outside the pool: over the pool)."""
    m_ex, m_im = _numpy(table, C.EXPLICIT_MARGIN), _numpy(table, C.IMPLICIT_MARGIN)
    with np.errstate(all="ignore"):  # rows outside the pool hold nulls (NaN here)
        cols = metrics.map_forms(m_ex, m_im, alpha, pool)
        for value, at in (rows_by_group(table.column(sel.by)).items() if group_pools is not None else ()):
            if value in group_pools:
                cols[C.MAP_Z][at] = metrics.map_z(m_ex[at], m_im[at], alpha, group_pools[value])
    for name, values in cols.items():
        table = C.set_column(table, name, pa.array(values, pa.float64(), mask=mask), pa.float64())
    cols.update({C.EXPLICIT_MARGIN: m_ex, C.IMPLICIT_MARGIN: m_im, C.PAIR_ID: table.column(C.PAIR_ID)})
    return C.set_column(table, SCORE, metrics.selection_score(sel.metric, cols, sel.seed), pa.float64())


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
