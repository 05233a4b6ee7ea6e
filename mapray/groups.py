"""Per-group selection (`selection.by`): which group a row is in, each group's rule and size, and what the
selection decided for it. The passes that find each group's cut-off are the pool-wide ones run per group
(`mapray.selection`); this module holds no pass of its own.

A group is the rows with one value in the `by` column of the scored rows; rows with no value form the group
"null". A group's rule is its quota (`selection.quotas`, by the value as text: an int is a count, a float a
share of the group), else the selection's rule, applied to the group's rows as it would be to a pool of them:
floor(share x n) rows, or min(k, n) (a group smaller than its count keeps every row and is reported `short`),
or every row above the threshold. Ties at a group's boundary are broken by pair_id, as over the pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mapray import columns as C
from mapray import metrics
from mapray.config import SelectionConfig
from mapray.errors import ConfigError

NULL = "null"  # the group of rows with no value, as quotas, the manifest and the card name it
MAX_GROUPS = 10_000  # more distinct values than this is an id column, not a mixture's groups


def label(value: Any) -> str:
    """A group's value as text: how quotas name it."""
    return NULL if value is None else str(value)


def group_index(column: pa.ChunkedArray | pa.Array) -> tuple[list, np.ndarray]:
    """A block's distinct values of the group column (None for null) and each row's index into them."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded = array.dictionary_encode(null_encoding="encode")
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False)


def rows_by_group(column) -> dict[Any, np.ndarray]:
    """Each value of the group column -> the positions of its rows."""
    values, index = group_index(column)
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(len(values) + 1))
    return {value: order[starts[i]:starts[i + 1]] for i, value in enumerate(values)}


def moments_by_group(rows: pa.Table, by: str) -> dict[Any, metrics.PoolMoments]:
    """The pool moments of each group of a block of pool rows."""
    m_ex = rows.column(C.EXPLICIT_MARGIN).to_numpy(zero_copy_only=False).astype(np.float64)
    m_im = rows.column(C.IMPLICIT_MARGIN).to_numpy(zero_copy_only=False).astype(np.float64)
    return {value: metrics.PoolMoments.of(m_ex[at], m_im[at]) for value, at in rows_by_group(rows.column(by)).items()}


def check_group_count(pools: dict, by: str) -> None:
    if len(pools) > MAX_GROUPS:
        raise ConfigError(f"selection.by: column {by!r} has {len(pools):,} distinct values in the pool; per-group "
                          f"selection takes at most {MAX_GROUPS:,} groups (a mixture's sources, tasks, languages)")


def check_group_column(schema: pa.Schema, by: str | None, key: str, what: str) -> None:
    """`by` names a column of single values in `schema` (`what`: where the column should be, for the message)."""
    if by is None:
        return
    if by not in schema.names:
        raise ConfigError(f"{key}: {what} has no column {by!r} (its columns: {', '.join(schema.names)})")
    _check_kind(schema.field(by).type, by, key)


def check_group_values(records: list[dict], by: str | None) -> None:
    """`selection.by` against the input's first rows, before anything runs: a column they have, of values to
    group by."""
    if by is None:
        return
    names = list(dict.fromkeys(name for record in records for name in record))
    if by not in names:
        raise ConfigError(f"selection.by: the input has no column {by!r} (its columns: {', '.join(names)})")
    try:
        kind = pa.array([record.get(by) for record in records]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise ConfigError(f"selection.by: column {by!r} holds values of several kinds in the input's first rows, "
                          "not values to group by") from None
    _check_kind(kind, by, "selection.by")


def _check_kind(kind: pa.DataType, by: str, key: str) -> None:
    if pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_floating(kind):
        raise ConfigError(f"{key}: column {by!r} holds {kind}, not values to group by (text, integers, booleans)")


@dataclass(frozen=True)
class GroupRule:
    """What a group asks for: the rule's name and value, the rows it keeps, and how many a count asked for
    beyond the group's size."""

    rule: str
    value: float
    keep: int | None  # None for a threshold: the count comes from the rows above it
    short: int = 0

    @classmethod
    def of(cls, sel: SelectionConfig, value: Any, size: int) -> GroupRule:
        rule, x = sel.group_rule(label(value))
        if rule == "threshold":
            return cls(rule, x, None)
        return cls(rule, x, metrics.selection_count(size, rule, x), max(0, int(x) - size) if rule == "top_k" else 0)


@dataclass(frozen=True)
class Group:
    """What the selection decided for one group: its pool (moments), rule, rows kept and cut-off."""

    value: Any
    pool: metrics.PoolMoments
    rule: GroupRule
    count: int
    cutoff: tuple[float, str] | None = None

    @property
    def size(self) -> int:
        return self.pool.explicit.count

    def keeps(self, scores: np.ndarray, pair_ids: pa.Array) -> np.ndarray:
        if self.rule.rule == "threshold":
            return scores > self.rule.value
        if self.count == self.size:  # every row: no cut-off to compare with
            return np.ones(len(scores), dtype=bool)
        return keeps_above(self.cutoff, scores, pair_ids)

    def summary(self) -> dict:
        out = {"value": self.value, "pool": self.size, "selected": self.count, "rule": self.rule.rule,
               self.rule.rule: self.rule.value}
        if self.rule.short:
            out["short"] = self.rule.short  # a count beyond the group's size: every row kept
        if self.cutoff is not None:
            out["cutoff"] = {"score": self.cutoff[0], C.PAIR_ID: self.cutoff[1]}
        return out


def keeps_above(cutoff: tuple[float, str] | None, scores: np.ndarray, pair_ids: pa.Array) -> np.ndarray:
    """Rows at or above the cut-off row in (score descending, pair_id ascending); none without a cut-off. Only
    the rows tied with the cut-off's score compare their pair_ids (Arrow's byte order: the order the cut-off was
    found in), so a block's ids are never made Python strings."""
    if cutoff is None:
        return np.zeros(len(scores), dtype=bool)
    score, pid = cutoff
    keep = scores > score
    tied = np.flatnonzero(scores == score)
    if tied.size:
        keep[tied] = pc.less_equal(pair_ids.take(pa.array(tied, pa.int64())), pid).to_numpy(zero_copy_only=False)
    return keep


def absent_quotas(sel: SelectionConfig, groups: dict) -> list[str]:
    """Quotas naming a value no pool row has (a typo, or a source gone from tonight's pool)."""
    present = {label(value) for value in groups}
    return sorted(name for name in sel.quotas if name not in present)
