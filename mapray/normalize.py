"""The normalize step: raw input batches -> the input's own columns + pair_id + canonical `_m_*` columns.

Every row comes out, good or bad: a bad row carries its reason in `_m_reject` and its raw content in `_m_raw`,
and the writers route it to `rejects/`. Nothing is dropped here and nothing raises on bad data.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pyarrow as pa

from mapray import columns as C
from mapray.config import ColumnNames
from mapray.formats import Pair, RejectRow, normalize_record
from mapray.inputs import LINE


@dataclass(frozen=True)
class NormalizeSpec:
    format: str  # a concrete format (auto already resolved from a sample)
    columns: ColumnNames
    needs_scores: bool  # reward.source == columns: a row without explicit scores cannot be scored
    max_row_chars: int
    passthrough: pa.Schema | None  # JSONL: the types of the input's own columns, inferred from a sample


def infer_passthrough_schema(sample: list[dict]) -> pa.Schema:
    """Types for the input's own JSONL fields. A field whose type the sample cannot settle (always null, or
    mixed) is kept as JSON text, so a later row never fails for a type the sample did not show."""
    names = list(dict.fromkeys(k for rec in sample for k in rec))
    fields = []
    for name in names:
        values = [rec.get(name) for rec in sample]
        try:
            type_ = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            type_ = pa.null()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(type_) else type_,
                               metadata={"json": "1"} if pa.types.is_null(type_) else None))
    return pa.schema(fields)


class Normalizer:
    """Ray Data map_batches function. Input: Parquet columns, or `_m_line` + `_m_source` for JSONL.
    Output: the input's own columns, `pair_id` and the `_m_*` columns of `mapray.columns.INTERNAL`."""

    def __init__(self, spec: NormalizeSpec):
        self.spec = spec

    def __call__(self, table: pa.Table) -> pa.Table:
        if LINE in table.column_names:
            records, reasons = _parse_lines(table.column(LINE).to_pylist())
            sources = table.column(C.SOURCE).to_pylist()
            base = None
        else:
            records = table.to_pylist()
            reasons = [None] * len(records)
            sources = [None] * len(records)
            base = table.drop_columns([c for c in (*C.INTERNAL, *C.SCORED) if c in table.column_names])
        pairs: list[Pair | None] = []
        for i, rec in enumerate(records):
            pair = None
            if reasons[i] is None:
                try:
                    pair = self._normalize(rec)
                except RejectRow as e:
                    reasons[i] = str(e)
            pairs.append(pair)
        if base is None:
            base = self._passthrough(records, reasons)
        ids = [p.pair_id if p is not None else _raw_id(rec, self.spec.columns.id) for p, rec in zip(pairs, records)]
        return _with_canonical(base, pairs, ids, reasons, records, sources)

    def _normalize(self, rec: dict) -> Pair:
        pair = normalize_record(rec, self.spec.format, self.spec.columns)
        size = sum(len(m["content"]) for m in pair.prompt) + sum(
            len(t) for t in (pair.chosen or "", pair.rejected or "", *(pair.candidates or [])))
        if size > self.spec.max_row_chars:
            raise RejectRow(f"row text is {size} characters, over input.max_row_chars ({self.spec.max_row_chars})")
        if self.spec.needs_scores and pair.score_chosen is None:
            missing = self.spec.columns.scores if pair.candidates is not None else self.spec.columns.score_chosen
            raise RejectRow(f"missing field '{missing}' (reward.source=columns needs explicit scores)")
        return pair

    def _passthrough(self, records: list, reasons: list) -> pa.Table:
        """Builds the JSONL row's own columns with the sampled types; a value that does not fit its column's
        type rejects the row, naming the field."""
        schema = self.spec.passthrough
        arrays = []
        for field in schema:
            values = [_field_value(rec, field, reasons[i] is None) for i, rec in enumerate(records)]
            try:
                arrays.append(pa.array(values, type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
                for i, v in enumerate(values):
                    try:
                        pa.array([v], type=field.type)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
                        reasons[i] = f"field '{field.name}' does not match the input's type {field.type}"
                        values[i] = None
                arrays.append(pa.array(values, type=field.type))
        for i, rec in enumerate(records):
            extra = [k for k in rec if k not in schema.names] if reasons[i] is None else []
            if extra:
                reasons[i] = f"field '{extra[0]}' is not among the input's columns (first rows define them)"
        if not arrays:  # no line of the sample parsed: the table still needs its row count
            return pa.table({C.PAIR_ID: pa.nulls(len(records), pa.string())})
        return pa.Table.from_arrays(arrays, schema=schema)


def _field_value(rec, field: pa.Field, keep: bool):
    if not keep or not isinstance(rec, dict):
        return None
    value = rec.get(field.name)
    if field.metadata and value is not None:
        return json.dumps(value, ensure_ascii=False)
    return value


def _parse_lines(lines: list[bytes]) -> tuple[list, list]:
    records, reasons = [], []
    for raw in lines:
        try:
            rec = json.loads(raw.decode("utf-8"))
            reason = None if isinstance(rec, dict) else f"row is a JSON {type(rec).__name__}, not an object"
        except UnicodeDecodeError:
            rec, reason = raw, "invalid UTF-8"
        except ValueError as e:
            rec, reason = raw, f"invalid JSON ({str(e).split(':')[0]})"
        records.append(rec)
        reasons.append(reason)
    return records, reasons


def _raw_id(rec, id_column: str | None) -> str | None:
    """A rejected row keeps its own id where it has one, so rejects/ can be joined back to the input."""
    if id_column is None or not isinstance(rec, dict) or rec.get(id_column) is None:
        return None
    return str(rec[id_column])


def _with_canonical(base: pa.Table, pairs: list, ids: list, reasons: list, records: list,
                    sources: list) -> pa.Table:
    good = [r is None for r in reasons]

    def col(get):
        return [get(p) if ok else None for p, ok in zip(pairs, good)]

    new = {
        C.PAIR_ID: ids,
        C.PROMPT: col(lambda p: json.dumps(p.prompt, ensure_ascii=False)),
        C.CHOSEN: col(lambda p: p.chosen),
        C.REJECTED: col(lambda p: p.rejected),
        C.CANDIDATES: col(lambda p: None if p.candidates is None else json.dumps(p.candidates, ensure_ascii=False)),
        C.SCORE_CHOSEN: col(lambda p: p.score_chosen),
        C.SCORE_REJECTED: col(lambda p: p.score_rejected),
        C.REJECT: reasons,
        C.REJECT_STAGE: ["normalize" if r is not None else None for r in reasons],
        C.RAW: [None if ok else raw_json(rec) for rec, ok in zip(records, good)],
        C.SOURCE: sources,
        C.ROW: [uuid.uuid4().hex for _ in records],
    }
    for name, values in new.items():
        base = C.set_column(base, name, values, C.INTERNAL_TYPES.get(name, pa.string()))
    return base


def raw_json(rec) -> str:
    """The raw row as JSON text for rejects/; undecodable bytes are kept with backslash escapes."""
    if isinstance(rec, bytes):
        return rec.decode("utf-8", errors="backslashreplace")
    return json.dumps(rec, ensure_ascii=False, default=str)
