"""The normalize step: raw input batches -> the input's own columns + pair_id + canonical `_m_*` columns.

Every row comes out, good or bad: a bad row carries its reason in `_m_reject` and its raw content in `_m_raw`,
and the writers route it to `rejects/`. Nothing is dropped here and nothing raises on bad data: no JSON value,
in any field, can stop the run (values no Parquet file can hold, such as a lone UTF-16 surrogate, set their row
aside, see `mapray.own_columns`); a JSONL reject keeps its line as it was in `_m_raw`.

The input's own columns come back unchanged: Parquet columns as read; JSONL columns typed from the sample rows
that would be scored, so bad rows never turn a valid row's value into another type or into JSON text (the rules,
and the one case of JSON text, are in `mapray.own_columns`). A valid row whose value does not fit its column's
type is set aside with a reason naming the field and the type.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pyarrow as pa

from mapray import columns as C
from mapray.config import ColumnNames
from mapray.formats import FORMATS, Pair, RejectRow, normalize_record
from mapray.inputs import LINE, parse_lines, table_rows
from mapray.own_columns import escape_surrogates, fit_column, infer_schema, misfit_reason, unstorable


@dataclass(frozen=True)
class NormalizeSpec:
    format: str  # a concrete format (auto already resolved from a sample)
    columns: ColumnNames
    needs_scores: bool  # reward.source == columns: a row without explicit scores cannot be scored
    max_row_chars: int
    own_schema: pa.Schema | None  # JSONL: the types of the input's own columns, inferred from a sample


def infer_own_schema(sample: list[dict], spec: NormalizeSpec | None = None) -> pa.Schema:
    """Types for the input's own JSONL fields, from the sample rows that `spec` would score (all storable rows
    where none would, or without a spec); see `mapray.own_columns` for the rules."""
    rows = [r for r in sample if isinstance(r, dict) and unstorable(r) is None]
    if spec is not None:
        normalizer = Normalizer(spec)
        rows = [r for r in rows if normalizer._read(r)[1] is None] or rows
    cols = spec.columns if spec is not None else ColumnNames()
    # columns a format reads as numbers keep a numeric type when the sample has no value for them
    unseen = {cols.score_chosen: pa.float64(), cols.score_rejected: pa.float64(), cols.scores: pa.list_(pa.float64())}
    return infer_schema(rows, unseen)


class Normalizer:
    """Ray Data map_batches function. Input: Parquet columns, or `_m_line` + `_m_source` for JSONL.
    Output: the input's own columns, `pair_id` and the `_m_*` columns of `mapray.columns.INTERNAL`."""

    def __init__(self, spec: NormalizeSpec):
        if spec.format not in FORMATS:  # here, not per row: `_read` turns a reader's errors into reasons
            raise ValueError(f"unknown format {spec.format!r}")
        self.spec = spec

    def __call__(self, table: pa.Table) -> pa.Table:
        jsonl = LINE in table.column_names and self.spec.own_schema is not None
        lines = table.column(LINE).to_pylist() if jsonl else None
        if lines is not None:
            records, reasons = parse_lines(lines)
            sources = table.column(C.SOURCE).to_pylist()
        else:
            records, reasons = table_rows(table)
            sources = [None] * len(records)
            dropped = (*C.INTERNAL, *filter(C.is_mapray_column, table.column_names),
                       *([EARLIER_KEY] if self.spec.columns.error is not None else []))
            base = table.drop_columns([c for c in dropped if c in table.column_names])
        pairs: list[Pair | None] = [None] * len(records)
        for i, rec in enumerate(records):
            if reasons[i] is None:
                pairs[i], reasons[i] = self._pair(rec, lines[i] if lines is not None else None)
        if lines is not None:
            base = self._own_columns(records, reasons)
        ids = [p.pair_id if p is not None else raw_id(rec, self.spec.columns.id) for p, rec in zip(pairs, records)]
        stages = [None if r is None else "generate" if self._set_aside_before(rec) else "normalize"
                  for rec, r in zip(records, reasons)]
        out = _with_canonical(base, pairs, ids, reasons, stages, records, sources)
        if lines is not None:  # a JSONL reject keeps its line as it was, escapes and all
            out = C.set_column(out, C.RAW, [None if r is None else raw_json(line) for line, r in zip(lines, reasons)],
                               pa.string())
        elif self.spec.columns.error is not None:
            out = self._earlier_origin(out, records)
        return out

    def _earlier_origin(self, out: pa.Table, records: list) -> pa.Table:
        """Rows an earlier step read from the user's input (self-play's generated/, `columns.error` set) keep
        where that input row came from: its file:line (`source`) and its line as read (`input_raw`), so a row set
        aside here or in any later stage is traced to the prompt file, not to mapray's intermediate row."""
        def carried(name: str) -> list:
            return [rec.get(name) if isinstance(rec, dict) else None for rec in records]

        out = C.set_column(out, C.SOURCE, carried(EARLIER_SOURCE), pa.string())
        return C.set_column(out, C.RAW, carried(EARLIER_RAW), pa.string())

    def _pair(self, rec: dict, line: bytes | None) -> tuple[Pair | None, str | None]:
        """The row's pair, or the reason it has none. `line`: the JSONL line (None: an Arrow row, storable)."""
        reason = unstorable(rec, line) if line is not None else None
        return (None, reason) if reason is not None else self._read(rec)

    def _read(self, rec: dict) -> tuple[Pair | None, str | None]:
        try:
            return self._normalize(rec), None
        except RejectRow as e:
            return None, str(e)
        except Exception as e:  # a format reader's bug must cost its row, not the run; the reason says so
            return None, f"internal error reading this row ({type(e).__name__}: {str(e)[:200]}); please report it"

    def _set_aside_before(self, rec) -> str | None:
        """The reason an earlier step (self-play generation) recorded in the row's `columns.error` column."""
        name = self.spec.columns.error
        value = rec.get(name) if name is not None and isinstance(rec, dict) else None
        return None if value is None else str(value)

    def _normalize(self, rec: dict) -> Pair:
        earlier = self._set_aside_before(rec)
        if earlier is not None:
            raise RejectRow(earlier)
        pair = normalize_record(rec, self.spec.format, self.spec.columns)
        size = pair.text_size()
        if size > self.spec.max_row_chars:
            raise RejectRow(f"row text is {size} characters, over input.max_row_chars ({self.spec.max_row_chars})")
        if self.spec.needs_scores and pair.score_chosen is None:
            missing = self.spec.columns.scores if pair.candidates is not None else self.spec.columns.score_chosen
            raise RejectRow(f"missing field '{missing}' (reward.source=columns needs explicit scores)")
        return pair

    def _own_columns(self, records: list, reasons: list) -> pa.Table:
        """The JSONL rows' own columns with the sampled types; a row with a field the sample did not have, or a
        value that does not fit its column's type, is set aside (see `mapray.own_columns`)."""
        schema = self.spec.own_schema
        names = set(schema.names)
        for i, rec in enumerate(records):
            extra = next((k for k in rec if k not in names), None) if reasons[i] is None else None
            if extra is not None:
                reasons[i] = f"field '{extra}' is not among the input's columns (first rows define them)"
        arrays = []
        for field in schema:
            values = [rec.get(field.name) if reasons[i] is None else None for i, rec in enumerate(records)]
            array, misfits = fit_column(field, values)
            for i in misfits:
                reasons[i] = misfit_reason(field, values[i])
            arrays.append(array)
        if not arrays:  # no line of the sample parsed: the table still needs its row count
            return pa.table({C.PAIR_ID: pa.nulls(len(records), pa.string())})
        return pa.Table.from_arrays(arrays, schema=schema)


# where an earlier step's rows (`columns.error` set: self-play's generated/) keep their input row's origin, and
# that step's own key per row (bookkeeping of generated/, not carried into scored/)
EARLIER_SOURCE, EARLIER_RAW, EARLIER_KEY = "source", "input_raw", "row_id"


def raw_id(rec, id_column: str | None) -> str | None:
    """A rejected row keeps its own id where it has one, so rejects/ can be joined back to the input."""
    if id_column is None or not isinstance(rec, dict) or not isinstance(rec.get(id_column), (str, int, float)):
        return None  # a list or an object is no id to join on
    return escape_surrogates(str(rec[id_column]))


def _with_canonical(base: pa.Table, pairs: list, ids: list, reasons: list, stages: list, records: list,
                    sources: list) -> pa.Table:
    good = [r is None for r in reasons]

    def col(get):
        return [get(p) if ok else None for p, ok in zip(pairs, good)]

    new = {
        C.PAIR_ID: ids,
        C.PROMPT: col(lambda p: _json(p.prompt)),
        C.CHOSEN: col(lambda p: _json(p.chosen)),
        C.REJECTED: col(lambda p: _json(p.rejected)),
        C.CANDIDATES: col(lambda p: _json(p.candidates)),
        C.CANDIDATE_REWARDS: col(lambda p: p.candidate_scores),
        C.SCORE_CHOSEN: col(lambda p: p.score_chosen),
        C.SCORE_REJECTED: col(lambda p: p.score_rejected),
        C.REJECT: reasons,
        C.REJECT_STAGE: stages,
        C.RAW: [None if ok else raw_json(rec) for rec, ok in zip(records, good)],
        C.SOURCE: sources,
        C.ROW: [uuid.uuid4().hex for _ in records],
    }
    for name, values in new.items():
        base = C.set_column(base, name, values, C.INTERNAL_TYPES.get(name, pa.string()))
    return base


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def raw_json(rec) -> str:
    """The raw row as JSON text for rejects/: undecodable bytes kept with backslash escapes; lone UTF-16
    surrogates, which UTF-8 (and so Arrow) cannot hold, written as JSON `\\uXXXX` escapes, so the text still
    parses back to the same value."""
    if isinstance(rec, bytes):
        return rec.decode("utf-8", errors="backslashreplace")
    try:
        return escape_surrogates(json.dumps(rec, ensure_ascii=False, default=str))
    except (RecursionError, ValueError) as e:  # nested beyond what Python's encoder takes
        return json.dumps(f"<row not written back as JSON: {type(e).__name__}>")
