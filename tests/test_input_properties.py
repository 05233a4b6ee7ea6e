"""Property tests for bad input (issue 9, items 2 and 3). They drive the driver's sample (`inputs.sample_records`),
the type inference (`normalize.infer_own_schema`) and the normalize step (`normalize.Normalizer`)
directly, for every input format, in JSONL and Parquet:

- no JSON value, in any field (keys too), at any position in the file, stops them: every row comes out, a bad
  one with its reason and its line as it was, and what comes out writes to Parquet (rows and rejects/);
- a valid row's own columns come back as they were; with bad rows in the file, exactly as a file of only the
  valid rows gives them (values and Arrow types); a sample too short to see a column's type sets a row aside
  with a reason naming the field, it never rewrites the value.

Fixed seed (derandomize) and bounded example counts: the whole file runs in well under a minute.
"""

import io
import json
import math
import uuid
from dataclasses import replace
from decimal import Decimal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapray import columns as C
from mapray.config import ColumnNames
from mapray.inputs import InputFiles, sample_records
from mapray.normalize import Normalizer, NormalizeSpec, infer_own_schema
from mapray.public_rows import TrlColumns, public_rows, reject_rows

FORMATS = ("standard", "conversational", "transcript", "candidates")
COLS = ColumnNames()
RUN = settings(derandomize=True, database=None, max_examples=30, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# text: every unicode category, C included (NUL and the other controls, private use, lone surrogates)
SPECIAL = ["\ud800", "\udfff", "x\udc00y", "\x00", "\ufeff", "\u202e", "\U0001f600", "\u2028", '"', "\\", ""]
ANY_TEXT = st.text(st.characters(categories=["L", "M", "N", "P", "S", "Z", "C"]), max_size=8) | st.sampled_from(
    SPECIAL)
CLEAN_CHAR = st.characters(categories=["L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Co"], exclude_characters="\n")
CLEAN_TEXT = st.text(CLEAN_CHAR, max_size=8)  # no surrogates; no newline, which would split an HH transcript
BIG_INTS = [2**63, -(2**63) - 1, 2**64, 10**40]
INT64 = st.integers(-(2**63), 2**63 - 1)


def json_values(text, ints):
    scalars = st.none() | st.booleans() | ints | st.floats() | text  # floats: NaN and infinities too
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                        max_leaves=8)


ANY_JSON = json_values(ANY_TEXT, INT64 | st.sampled_from(BIG_INTS))
STORABLE_JSON = json_values(CLEAN_TEXT, INT64)

# the input's own columns: each generated file gives each name one of these kinds
OWN_KINDS = {
    "int": INT64,
    "number": st.floats() | st.integers(-(2**53), 2**53),  # ints among floats: a float64 column
    "text": st.text(st.characters(categories=["L", "M", "N", "P", "S", "Z", "Cc"]), max_size=8),
    "bool": st.booleans(),
    "texts": st.lists(CLEAN_TEXT, max_size=3),
    "record": st.fixed_dictionaries({}, optional={"a": st.integers(-5, 5) | st.none(), "b": CLEAN_TEXT,
                                                  "c": st.lists(st.floats(allow_nan=False), max_size=2)}),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                "content": CLEAN_TEXT}), max_size=2),
    "wild": STORABLE_JSON,  # any storable JSON: mixed kinds, mixed arrays, {}
}
OWN_NAMES = ["source", "rating", "tags", "meta", "flag", "turns"]
SCORE = st.floats(-100, 100) | st.integers(-100, 100)


def msg(role, content):
    return {"role": role, "content": content}


@st.composite
def valid_row(draw, fmt: str, i: int, own: dict) -> dict:
    q, a, b = (f"{tag} {i} {draw(CLEAN_TEXT)}" for tag in ("question", "yes", "no"))
    scores = {"score_chosen": draw(SCORE), "score_rejected": draw(SCORE)}
    if fmt == "standard":
        row = {"prompt": q, "chosen": a, "rejected": b, **scores}
    elif fmt == "conversational":
        row = {"chosen": [msg("user", q), msg("assistant", a)], "rejected": [msg("user", q), msg("assistant", b)],
               **scores}
    elif fmt == "transcript":
        row = {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}",
               **scores}
    else:
        row = {"prompt": q, "all_generated_responses": [a, b, f"maybe {i}"], "all_rm_scores": [draw(SCORE)] * 3}
    row.update({name: draw(st.none() | OWN_KINDS[kind]) for name, kind in own.items()})
    return row


def _inject(value, text: str):
    """value with text appended to its first string, wherever it is nested; [value, text] if it has none."""
    if isinstance(value, str):
        return value + text
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value)) if isinstance(
        value, list) else []
    for key, item in items:
        if isinstance(item, (str, list, dict)):
            value = dict(value) if isinstance(value, dict) else list(value)
            value[key] = _inject(item, text)
            return value
    return [value, text]


def _nest(depth: int, value, as_dict: bool):
    for _ in range(depth):
        value = {"k": value} if as_dict else [value]
    return value


def encode(row, ascii_only: bool = True) -> bytes:
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")


@st.composite
def bad_line(draw, fmt: str, row: dict) -> bytes:
    """A line no format can score: a broken required field, a value no Parquet file holds, or not a row."""
    how = draw(st.sampled_from(["field", "surrogate", "surrogate key", "big int", "deep", "deep line", "bytes",
                                "not an object", "cesu"]))
    field = draw(st.sampled_from(sorted(row)))
    if draw(st.booleans()):  # a bad row's own columns may hold anything: they must not shape the types
        row[draw(st.sampled_from(OWN_NAMES + ["junk"]))] = draw(ANY_JSON)
    if how == "field":
        main = "all_generated_responses" if fmt == "candidates" else "chosen"
        row[main] = draw(ANY_JSON.filter(lambda v: not isinstance(v, (str, list))))
    elif how in ("surrogate", "cesu"):  # a high surrogate that ends a string pairs with nothing
        row[field] = _inject(row[field], draw(st.sampled_from(["\ud800", "\udfff\udbff", "a\udbff"])))
    elif how == "surrogate key":
        row[draw(ANY_TEXT) + "\ud800"] = draw(ANY_JSON)
    elif how == "big int":
        row[field] = draw(st.sampled_from(BIG_INTS)) if draw(st.booleans()) else [1, {"n": draw(
            st.sampled_from(BIG_INTS))}]
    elif how == "deep":
        row[field] = _nest(draw(st.integers(33, 200)), row[field], draw(st.booleans()))
    elif how == "deep line":
        depth = draw(st.integers(1000, 5000))
        return b'{"chosen": ' + b"[" * depth + b"]" * depth + b"}"
    elif how == "bytes":
        return draw(st.binary(min_size=1, max_size=24).filter(lambda b: b"\n" not in b and b.strip()))
    elif how == "not an object":
        return encode(draw(ANY_JSON.filter(lambda v: not isinstance(v, dict))))
    return encode(row, ascii_only=how != "cesu")  # cesu: surrogates as UTF-8 bytes, which is invalid UTF-8


@st.composite
def jsonl_file(draw, fmt: str, kinds: list[str]) -> tuple[list[bytes], list[dict | None]]:
    """Lines of valid rows and bad lines mixed; for each line its row when valid, None when bad."""
    own = draw(st.dictionaries(st.sampled_from(OWN_NAMES), st.sampled_from(kinds), max_size=3))
    lines, rows = [], []
    for i in range(draw(st.integers(1, 10))):
        row = draw(valid_row(fmt, i, own))
        if draw(st.booleans()):
            lines.append(encode(row, ascii_only=draw(st.booleans())))
            rows.append(row)
        else:
            lines.append(draw(bad_line(fmt, row)))
            rows.append(None)
    return lines, rows


def normalize_jsonl(fmt: str, lines: list[bytes], sample_rows: int) -> pa.Table:
    """The pipeline's JSONL path without Ray: the driver's sample from the file, its types, the normalize step."""
    uri = f"memory://mapray-props/{uuid.uuid4().hex}.jsonl"
    with fsspec.open(uri, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    try:
        sample = sample_records(InputFiles([uri], "jsonl", None, [uri]), sample_rows)
    finally:
        fsspec.filesystem("memory").rm(uri)
    spec = NormalizeSpec(fmt, COLS, needs_scores=True, max_row_chars=10**6, own_schema=None)
    spec = replace(spec, own_schema=infer_own_schema(sample, spec))
    table = pa.table({"_m_line": pa.array(lines, pa.binary()),
                      C.SOURCE: pa.array([f"f.jsonl:{i + 1}" for i in range(len(lines))], pa.string())})
    return Normalizer(spec)(table)


def own_columns(out: pa.Table) -> list[str]:
    return [n for n in out.column_names if not n.startswith("_m_") and n != C.PAIR_ID]


def same_json(value, back) -> bool:
    """back is value as the input had it: same JSON types and values (NaN is NaN); a key the object lacks
    reads null; an int in a float64 column reads as the equal float."""
    if isinstance(value, dict):
        return isinstance(back, dict) and set(value) <= set(back) and all(
            same_json(value.get(k), b) for k, b in back.items())
    if isinstance(value, list):
        return isinstance(back, list) and len(value) == len(back) and all(map(same_json, value, back))
    if isinstance(value, float) and math.isnan(value):
        return isinstance(back, float) and math.isnan(back)
    if type(value) is int and type(back) is float:
        return value == back
    return type(value) is type(back) and value == back


def assert_own_columns_kept(out: pa.Table, i: int, row: dict) -> None:
    for name in own_columns(out):
        back = out.column(name)[i].as_py()
        field = out.schema.field(name)
        if field.metadata and field.metadata.get(b"json") and back is not None:
            back = json.loads(back)  # a column Arrow has no type for: JSON text, said in its metadata
        assert same_json(row.get(name), back), (name, row.get(name), back, field.type)


def assert_writes(out: pa.Table) -> None:
    """The rows write to Parquet and read back (the staged normalize output), and so do their rejects/."""
    conversational = any(v is not None and v.startswith("[") for v in out.column(C.PROMPT).to_pylist())
    public = public_rows(out, TrlColumns(conversational))
    for table in (out, reject_rows(public)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        assert pq.read_table(io.BytesIO(buf.getvalue())).num_rows == table.num_rows


@pytest.mark.parametrize("fmt", FORMATS)
@RUN
@given(data=st.data())
def test_no_json_value_in_any_field_stops_a_run(fmt, data):
    lines, rows = data.draw(jsonl_file(fmt, [k for k in OWN_KINDS if k != "wild"]))
    out = normalize_jsonl(fmt, lines, sample_rows=len(lines))
    reasons = out.column(C.REJECT).to_pylist()
    assert out.num_rows == len(lines)
    assert [r is None for r in reasons] == [row is not None for row in rows], reasons
    assert not any("internal error" in r for r in reasons if r)
    raw = out.column(C.RAW).to_pylist()
    for i, row in enumerate(rows):
        if row is None:  # a reject keeps its line as it was (invalid bytes backslash-escaped)
            assert raw[i] == lines[i].decode("utf-8", errors="backslashreplace")
        else:
            assert_own_columns_kept(out, i, row)
    assert_writes(out)


@pytest.mark.parametrize("fmt", FORMATS)
@RUN
@given(data=st.data())
def test_bad_rows_never_change_the_valid_rows_own_columns(fmt, data):
    lines, rows = data.draw(jsonl_file(fmt, list(OWN_KINDS)))
    out = normalize_jsonl(fmt, lines, sample_rows=len(lines))
    scored = [i for i, r in enumerate(out.column(C.REJECT).to_pylist()) if r is None]
    assert all(rows[i] is not None for i in scored)
    if not scored:  # nothing to compare: a sample without a valid row types the columns from all its rows
        return
    clean = normalize_jsonl(fmt, [lines[i] for i in scored], sample_rows=len(scored))
    assert clean.column(C.REJECT).null_count == clean.num_rows == len(scored)
    names = own_columns(out)
    assert own_columns(clean) == names
    mine, theirs = out.take(pa.array(scored, pa.int64())).select(names), clean.select(names)
    assert mine.schema.equals(theirs.schema, check_metadata=True), (mine.schema, theirs.schema)
    for k, i in enumerate(scored):
        assert_own_columns_kept(out, i, rows[i])
        assert same_json(theirs.slice(k, 1).to_pylist()[0], mine.slice(k, 1).to_pylist()[0])
    assert_writes(out)


@pytest.mark.parametrize("fmt", FORMATS)
@RUN
@given(data=st.data())
def test_a_short_sample_sets_rows_aside_and_never_rewrites_them(fmt, data):
    lines, rows = data.draw(jsonl_file(fmt, list(OWN_KINDS)))
    out = normalize_jsonl(fmt, lines, sample_rows=data.draw(st.integers(1, len(lines))))
    for i, reason in enumerate(out.column(C.REJECT).to_pylist()):
        if reason is None:
            assert_own_columns_kept(out, i, rows[i])
        elif rows[i] is not None:  # a valid row set aside for its own columns: the reason names the field
            assert reason.startswith("field '") and ("does not match the input's type" in reason
                                                     or "is not among the input's columns" in reason), reason
    assert_writes(out)


# Parquet: the format's columns in the types a writer may have used, and columns of odd types beside them
TEXT_TYPES = [pa.string(), pa.large_string(), "dictionary", pa.binary()]  # binary: bytes, not text
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPES = [pa.list_(MESSAGE), pa.large_list(MESSAGE),
                  pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int64())]))]
SCORE_TYPES = [pa.float64(), pa.int64(), pa.float32(), pa.decimal128(12, 3), pa.string()]
ODD_COLUMNS = {
    "blob": lambda draw, n: pa.array(draw(st.lists(st.binary(max_size=6) | st.none(), min_size=n, max_size=n))),
    "nothing": lambda draw, n: pa.nulls(n),
    "nested": lambda draw, n: pa.array(draw(st.lists(st.none() | st.fixed_dictionaries(
        {"a": st.lists(INT64, max_size=2), "b": st.fixed_dictionaries({"c": st.none() | CLEAN_TEXT})}),
        min_size=n, max_size=n))),
    "big": lambda draw, n: pa.array(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)), pa.uint64()),
    "half": lambda draw, n: pa.array(draw(st.lists(st.floats(-1e4, 1e4), min_size=n, max_size=n))).cast(
        pa.float16()),
    "stamp": lambda draw, n: pa.array(draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n)),
                                      pa.int64()).cast(pa.timestamp("s", tz="UTC")),
    "pairs": lambda draw, n: pa.array(draw(st.lists(st.lists(st.tuples(CLEAN_TEXT, INT64), max_size=2),
                                                    min_size=n, max_size=n)), pa.map_(pa.string(), pa.int64())),
    # values Python cannot read: invalid UTF-8 in a string column, a date past year 9999
    "bad_utf8": lambda draw, n: pa.array(draw(st.lists(st.sampled_from([b"ok", b"\xff\xfe", b"\xed\xa0\x80"]),
                                                       min_size=n, max_size=n)), pa.binary()).view(pa.string()),
    "far_future": lambda draw, n: pa.array(draw(st.lists(st.sampled_from([0, 2**62]), min_size=n, max_size=n)),
                                           pa.int64()).view(pa.timestamp("us")),
}


def _unreadable(column: pa.Array, i: int) -> bool:
    try:
        column[i].as_py()
        return False
    except (ValueError, OverflowError):
        return True


def _format_column(draw, name: str, values: list) -> tuple[pa.Array, bool]:
    """The column in a type drawn for it, and whether that type holds what the format reads."""
    if name in ("score_chosen", "score_rejected", "all_rm_scores"):
        type_ = draw(st.sampled_from(SCORE_TYPES))
        convert = {"int64": round, "string": lambda x: f"{x:.3f}", "decimal128(12, 3)": lambda x: Decimal(f"{x:.3f}")}
        fn = convert.get(str(type_), float)
        values = [None if v is None else [fn(x) for x in v] if isinstance(v, list) else fn(v) for v in values]
        array = pa.array(values, pa.list_(type_) if name == "all_rm_scores" else type_)
        return array, pa.types.is_floating(type_) or pa.types.is_integer(type_)
    if any(isinstance(v, list) and v and isinstance(v[0], dict) for v in values):
        return pa.array(values, draw(st.sampled_from(MESSAGES_TYPES))), True
    if any(isinstance(v, list) for v in values):
        return pa.array(values, pa.list_(pa.string())), True
    type_ = draw(st.sampled_from(TEXT_TYPES))
    if type_ == "dictionary":
        return pa.array(values, pa.string()).dictionary_encode(), True
    if type_ == pa.binary():
        return pa.array([None if v is None else v.encode() for v in values], pa.binary()), False
    return pa.array(values, type_), True


@pytest.mark.parametrize("fmt", FORMATS)
@RUN
@given(data=st.data())
def test_parquet_of_odd_types_never_stops_a_run(fmt, data):
    n = data.draw(st.integers(1, 8))
    rows = [data.draw(valid_row(fmt, i, {})) for i in range(n)]
    spoiled = [data.draw(st.booleans()) for _ in range(n)]
    for row, spoil in zip(rows, spoiled):
        if spoil:  # in its column's type: a null, or an empty text or list
            name = data.draw(st.sampled_from([k for k in row if not k.startswith("score")]))
            row[name] = data.draw(st.sampled_from([None, "" if isinstance(row[name], str) else []]))
    columns, readable_types = {}, True
    for name in rows[0]:
        columns[name], fits = _format_column(data.draw, name, [row[name] for row in rows])
        readable_types = readable_types and fits
    for name in data.draw(st.lists(st.sampled_from(sorted(ODD_COLUMNS)), unique=True, max_size=4)):
        columns[name] = ODD_COLUMNS[name](data.draw, n)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    table = pq.read_table(io.BytesIO(buf.getvalue()))

    uri = f"memory://mapray-props/{uuid.uuid4().hex}.parquet"
    with fsspec.open(uri, "wb") as f:
        f.write(buf.getvalue())
    try:
        sample = sample_records(InputFiles([uri], "parquet", None, [uri]), n)
    finally:
        fsspec.filesystem("memory").rm(uri)
    unreadable = [any(_unreadable(column, i) for column in table.columns) for i in range(n)]
    assert len(sample) == n - sum(unreadable)

    out = Normalizer(NormalizeSpec(fmt, COLS, needs_scores=True, max_row_chars=10**6, own_schema=None))(table)
    reasons = out.column(C.REJECT).to_pylist()
    assert out.num_rows == n and not any("internal error" in r for r in reasons if r)
    for i, reason in enumerate(reasons):
        if unreadable[i]:
            assert "cannot be read in Python" in reason
        elif readable_types and not spoiled[i]:
            assert reason is None, reason
    for name in own_columns(out):  # Parquet's own columns as read, every row
        assert out.column(name).equals(table.column(name)), name
    assert_writes(out)
