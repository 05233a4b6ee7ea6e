"""The rows mapray hands out, from the internal rows its steps pass along (`mapray.columns`).

A public row is TRL's `prompt`, `chosen`, `rejected` (the pair mapray scored, explicit prompt), the input's own
columns, then mapray's columns in their documented order (`mapray.columns.SCORED`); a row that was set aside
also carries why (`reject_reason`, `reject_stage`), where it came from (`reject_source`, file:line of JSONL
input) and the input row as JSON (`reject_raw`); those four are null on every other row. scored/ holds the good
rows without them, rejects/ the rest as `pair_id, reason, stage, source, raw` (`reject_rows`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from mapray import columns as C
from mapray.config import ColumnNames
from mapray.normalize import raw_json
from mapray.reasons import code_of


@dataclass(frozen=True)
class TrlColumns:
    """How a run writes TRL's `prompt`, `chosen`, `rejected` (the pair it scored, explicit prompt).

    An input column of one of those names whose values are not already that (an implicit prompt inside chosen, an
    HH transcript, UltraFeedback's full conversations, a candidates row's prompt string; a candidates row's
    message-list prompt is TRL's already) is kept, renamed
    `original_<name>`; where the input already is TRL's explicit-prompt form, its columns are the ones written."""

    conversational: bool
    candidates: bool = False
    originals: tuple[str, ...] = ()

    @classmethod
    def of(cls, fmt: str, cols: ColumnNames, sample: dict) -> TrlColumns:
        explicit = (fmt == "standard" and isinstance(sample.get(cols.prompt), str)) or (
            fmt in ("conversational", "candidates") and isinstance(sample.get(cols.prompt), list))
        own_names = (cols.prompt, cols.chosen, cols.rejected)
        kept_as_is = explicit and own_names == C.TRL_COLUMNS
        originals = () if kept_as_is else tuple(n for n in C.TRL_COLUMNS if n in sample)
        return cls(fmt != "standard", fmt == "candidates", originals)


def own_column_names(table: pa.Table) -> list[str]:
    """The input's own columns of an internal table: neither mapray's public columns nor its internal ones."""
    return [c for c in table.column_names if not C.is_mapray_column(c) and not c.startswith(C.INTERNAL_PREFIX)]


def public_rows(table: pa.Table, trl: TrlColumns) -> pa.Table:
    """Internal rows -> public rows (the module docstring)."""
    columns = {name: _trl_array(table.column(internal), trl.conversational)
               for name, internal in zip(C.TRL_COLUMNS, (C.PROMPT, C.CHOSEN, C.REJECTED))}
    if trl.candidates:
        columns[C.CANDIDATE_REWARDS_OUT] = table.column(C.CANDIDATE_REWARDS)
    for name in own_column_names(table):
        if name in C.TRL_COLUMNS and name not in trl.originals:
            continue  # the same values, written once as TRL's column
        columns[C.ORIGINAL_PREFIX + name if name in trl.originals else name] = table.column(name)
    columns.update({c: table.column(c) for c in C.mapray_order(table.column_names)})
    columns.update(_reject_columns(table))
    return pa.table(columns)


def _trl_array(column: pa.ChunkedArray, conversational: bool) -> pa.Array:
    values = [None if v is None else json.loads(v) for v in column.to_pylist()]
    return pa.array(values, C.MESSAGES if conversational else pa.string())


def _reject_columns(table: pa.Table) -> dict[str, pa.Array]:
    """reject_reason, _stage, _source, _raw; for a row set aside after normalize, `raw` is rebuilt from the input's
    own columns (normalize keeps a JSONL line as it was)."""
    reason = table.column(C.REJECT)
    rejected = pc.is_valid(reason)
    raw = table.column(C.RAW).to_pylist()
    own = None
    for i in pc.indices_nonzero(pc.and_(rejected, pc.is_null(table.column(C.RAW)))).to_pylist():
        own = own or table.select(own_column_names(table))
        raw[i] = raw_json(own.slice(i, 1).to_pylist()[0])
    return {C.REJECT_REASON: reason,
            C.REJECT_PREFIX + C.STAGE: table.column(C.REJECT_STAGE),
            C.REJECT_PREFIX + C.SOURCE_OUT: pc.if_else(rejected, table.column(C.SOURCE), pa.scalar(None, pa.string())),
            C.REJECT_PREFIX + C.RAW_OUT: pa.array(raw, pa.string())}


def reason_column(table: pa.Table) -> str | None:
    """Where a row set aside carries its reason: `reject_reason` in public rows, `_m_reject` between steps;
    None in rows that are all good (scored/ read back)."""
    return next((c for c in (C.REJECT_REASON, C.REJECT) if c in table.column_names), None)


def good(table: pa.Table) -> pa.Table:
    """The rows not set aside."""
    reason = reason_column(table)
    return table if reason is None else table.filter(pc.is_null(table.column(reason)))


def rejected(table: pa.Table) -> pa.Table:
    reason = reason_column(table)
    return table.slice(0, 0) if reason is None else table.filter(pc.is_valid(table.column(reason)))


def scored_rows(table: pa.Table) -> pa.Table:
    """Good public rows as scored/ holds them: without the reject columns and any internal column."""
    return good(table).drop_columns([c for c in table.column_names
                                     if c in C.REJECT_COLUMNS or c.startswith(C.INTERNAL_PREFIX)])


def reject_rows(table: pa.Table) -> pa.Table:
    """Public rows set aside -> rejects/ rows (`mapray.columns.REJECTS_SCHEMA`)."""
    table = rejected(table)
    reasons = table.column(C.REJECT_REASON)
    own = [C.REASON, C.STAGE, C.SOURCE_OUT, C.RAW_OUT]
    return pa.table({C.PAIR_ID: table.column(C.PAIR_ID).cast(pa.string()),
                     C.REASON_CODE: pa.array([code_of(r) for r in reasons.to_pylist()], pa.string()),
                     **{name: table.column(C.REJECT_PREFIX + name) for name in own}},
                    schema=C.REJECTS_SCHEMA)
