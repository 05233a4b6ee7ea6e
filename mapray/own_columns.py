"""The input's own JSONL columns: the Arrow type each one gets, and which values fit it.

JSONL has no schema, so the types come from a sample of the first rows (`input.schema_sample_rows`), and only
from the sample rows that will be scored (`mapray.normalize.infer_own_schema` picks them): a row set
aside for any reason never shapes a column. Within those rows:

- A column takes the type of its most common kind of JSON value (string, number, bool, array, object; ties go
  to the kind seen first). Numbers are int64, or float64 when a float is among them (ints then read as equal
  floats). Arrays and objects take the union of their element types and keys where Arrow can unify them (an
  object that lacks a key reads null there).
- A value fits its column when Arrow gives it back exactly as it came: same values, same JSON types (pyarrow
  alone would turn 8.5 into 8 in an int64 column, "ab" into ["a", "b"], and drop unknown object keys). A row
  with a value that does not fit is set aside with a reason naming the field and the type; no value of a
  valid row is ever re-encoded, so scored/ gives each valid row's own columns back as they were.
- Rows that do not fit are dropped from the sample and the types inferred again, until every remaining row
  fits: the schema is then exactly what a file of only the valid rows gives.
- A column null in every sampled row gets the type a format reads it as (the score columns: float64, the
  candidates' scores: a list of float64) or else string; a later value of another type sets its row aside,
  and the reason says to sample more rows.
- JSON text, only where Arrow has no type for the column: its most common kind is arrays that mix kinds
  ([1, "a"]), or objects that never have a key ({}: Parquet cannot store a struct without fields). Then every
  value of the column is written as JSON text, and the field carries the metadata {"json": "1"}.

Before any of that, `unstorable` finds the values no Parquet file can hold: a lone UTF-16 surrogate (valid JSON
"\\ud800", which UTF-8 cannot encode) in a key or a string, an integer outside int64, nesting deeper than
`MAX_DEPTH` (Parquet readers stop at 100 schema levels; a list takes two). Their rows are set aside.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pyarrow as pa

MAX_DEPTH = 32
JSON_TEXT = {"json": "1"}
MAX_ROUNDS = 10  # a sample whose misfits keep changing the types stops here; later misfits are still set aside
_INT64 = (-(2**63), 2**63 - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")
_DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))  # digits -> "0", all else -> " "
_ARROW_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)  # ValueError: UnicodeEncodeError too


def unstorable(rec: dict, line: bytes | None = None) -> str | None:
    """Why no Parquet file can hold this JSON row as it is; None when it can. `line`: the row's JSON text, which
    spares the walk through the values when nothing in it can hold such a value."""
    if line is not None and not _may_be_unstorable(line):
        return None
    for key, value in rec.items():
        if _has_surrogate(key):
            return f"field name '{escape_surrogates(key)}' holds a lone UTF-16 surrogate, which UTF-8 cannot encode"
        problem = _value_problem(value)
        if problem is not None:
            return f"field '{key}' {problem}"
    return None


def _may_be_unstorable(line: bytes) -> bool:
    """What a JSON line needs before it can hold such a value: a \\uDxxx escape (a surrogate's bytes are invalid
    UTF-8), a run of 19 digits (int64 holds every 18-digit integer), more than MAX_DEPTH brackets. Byte scans:
    much faster than a walk through the parsed values."""
    return (b"\\ud" in line or b"\\uD" in line or b"0" * 19 in line.translate(_DIGITS)
            or line.count(b"[") + line.count(b"{") > MAX_DEPTH)


def _value_problem(value) -> str | None:
    stack = [(value, 1)]  # iterative: a deep value must not hit Python's recursion limit here
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str) and _has_surrogate(v):
            return "holds a lone UTF-16 surrogate, which UTF-8 cannot encode"
        if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            return "holds an integer outside the signed 64-bit range"
        if isinstance(v, (list, dict)):
            if depth > MAX_DEPTH:
                return f"is nested deeper than {MAX_DEPTH} levels"
            if isinstance(v, dict):
                if any(_has_surrogate(k) for k in v):
                    return "holds a key with a lone UTF-16 surrogate, which UTF-8 cannot encode"
                v = v.values()
            stack.extend((x, depth + 1) for x in v)
    return None


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def escape_surrogates(text: str) -> str:
    """Lone surrogates as JSON `\\uXXXX` escapes: the text becomes valid UTF-8, and JSON text stays the same
    JSON value."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def infer_schema(rows: list[dict], unseen: dict[str, pa.DataType]) -> pa.Schema:
    """The types of the rows' own columns (see the module docstring); `unseen`: the type of a column that is
    null in every row, by name (string otherwise)."""
    cache: dict = {}
    for _ in range(MAX_ROUNDS):
        schema = pa.schema([_field(name, [r.get(name) for r in rows], unseen.get(name, pa.string()), cache)
                            for name in dict.fromkeys(k for r in rows for k in r)])
        misfits = set()
        for field in schema:
            misfits.update(fit_column(field, [r.get(field.name) for r in rows])[1])
        if not misfits:
            break
        rows = [r for i, r in enumerate(rows) if i not in misfits]
    return schema


def _field(name: str, values: list, unseen: pa.DataType, cache: dict) -> pa.Field:
    present = [v for v in values if v is not None]
    if not present:
        return pa.field(name, unseen)
    kind = Counter(map(_kind, present)).most_common(1)[0][0]  # ties: the kind seen first
    types = Counter(_value_type(v, cache) for v in present if _kind(v) == kind)
    merged = None
    for type_, _ in types.most_common():
        if type_ is not None:
            merged = type_ if merged is None else _unify(merged, type_)
    merged = None if merged is None else _settle(merged)
    return pa.field(name, pa.string(), metadata=JSON_TEXT) if merged is None else pa.field(name, merged)


_KINDS = {bool: "bool", int: "number", float: "number", str: "string", list: "array", dict: "object"}


def _kind(value) -> str:
    return _KINDS.get(type(value), type(value).__name__)


_SCALARS = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), float: pa.float64()}


def _value_type(value, cache: dict) -> pa.DataType | None:
    """The value's own Arrow type; None where Arrow has none (an array mixing kinds)."""
    if type(value) in _SCALARS:
        return _SCALARS[type(value)]
    if id(value) not in cache:  # the sample's values live as long as the sample: ids stay unique
        try:
            cache[id(value)] = pa.array([value]).type
        except _ARROW_ERRORS:
            cache[id(value)] = None
    return cache[id(value)]


def _unify(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """a and b merged (int64 with float64, struct keys, null with anything); a where they do not merge."""
    try:
        schemas = [pa.schema([("x", a)]), pa.schema([("x", b)])]
        return pa.unify_schemas(schemas, promote_options="permissive").field("x").type
    except _ARROW_ERRORS:
        return a


def _settle(type_: pa.DataType) -> pa.DataType | None:
    """Nested nulls (from [] or {"k": null}) become string; None where Parquet cannot store the type."""
    if pa.types.is_null(type_):
        return pa.string()
    if pa.types.is_list(type_):
        item = _settle(type_.value_type)
        return None if item is None else pa.list_(item)
    if pa.types.is_struct(type_):
        fields = [(f.name, _settle(f.type)) for f in type_]
        return None if not fields or any(t is None for _, t in fields) else pa.struct(fields)
    return type_


def fit_column(field: pa.Field, values: list) -> tuple[pa.Array, list[int]]:
    """The column's array, and the indices of the values that do not fit its type (null in the array)."""
    if field.metadata and field.metadata.get(b"json"):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string()), []
    try:
        array = pa.array(values, type=field.type)
        if pa.types.is_string(field.type):  # pyarrow takes only str there, and gives it back as it was
            misfits = []
        else:  # with only strings at the leaves, == cannot confuse 1, 1.0 and True: a fast first check
            text = _text_leaves(field.type)
            misfits = [i for i, (v, b) in enumerate(zip(values, array.to_pylist()))
                       if not (text and v == b) and not _same(v, b)]
    except _ARROW_ERRORS:
        misfits = [i for i, v in enumerate(values) if v is not None and not _fits_alone(v, field.type)]
    if misfits:
        drop = set(misfits)
        array = pa.array([None if i in drop else v for i, v in enumerate(values)], type=field.type)
    return array, misfits


def _text_leaves(type_: pa.DataType) -> bool:
    if pa.types.is_list(type_):
        return _text_leaves(type_.value_type)
    if pa.types.is_struct(type_):
        return all(_text_leaves(f.type) for f in type_)
    return pa.types.is_string(type_)


def _fits_alone(value, type_: pa.DataType) -> bool:
    try:
        return _same(value, pa.array([value], type=type_)[0].as_py())
    except _ARROW_ERRORS:
        return False


def _same(value, back) -> bool:
    """value came back from Arrow unchanged: same JSON types and values; an object's missing keys read null,
    an int in a float64 column reads as the equal float."""
    if value is None or back is None:
        return value is back
    if isinstance(value, dict):
        return isinstance(back, dict) and value.keys() <= back.keys() and all(
            _same(value.get(k), b) for k, b in back.items())
    if isinstance(value, list):
        return isinstance(back, list) and len(value) == len(back) and all(map(_same, value, back))
    if type(value) is float and value != value:
        return type(back) is float and back != back
    if type(value) is int and type(back) is float:
        return value == back  # Python compares them exactly
    return type(value) is type(back) and value == back


def misfit_reason(field: pa.Field, value) -> str:
    type_ = str(field.type)
    type_ = type_ if len(type_) <= 80 else type_[:77] + "..."
    kind = _kind(value)
    kind = f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
    return (f"field '{field.name}' does not match the input's type {type_}: it holds {kind} "
            "(types come from the first input.schema_sample_rows rows)")
