"""A corpus of malformed rows of every input format, mixed into valid data and run through the whole pipeline:
no crash, every bad row in rejects/ with its specific reason, input = scored + rejected."""

import json
from dataclasses import replace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapray import columns as C
from mapray.config import ColumnNames, load_config
from mapray.inputs import InputFiles, sample_records
from mapray.normalize import Normalizer, NormalizeSpec, infer_own_schema, raw_json
from mapray.pipeline import score
from mapray.reasons import code_of
from tests.conftest import unloadable_copy


def m(role, content):
    return {"role": role, "content": content}


def chat(prompt, answer):
    return [m("user", prompt), m("assistant", answer)]


def valid(fmt: str, i: int) -> dict:
    q, a, b = f"question {i}: how to cook a steak?", f"heat the oven {i}", f"no idea {i}"
    if fmt == "standard" and i == 8:  # TRL's implicit prompt: the common leading text of chosen and rejected
        return {"id": f"ok{i}", "chosen": f"{q} {a}", "rejected": f"{q} {b}", "score_chosen": 5.0 + i,
                "score_rejected": 1.0, "source": "web"}
    if fmt == "standard":
        return {"id": f"ok{i}", "prompt": q, "chosen": a, "rejected": b, "score_chosen": 5.0 + i,
                "score_rejected": 1.0, "source": "web"}
    if fmt == "conversational":
        return {"id": f"ok{i}", "chosen": chat(q, a), "rejected": chat(q, b), "score_chosen": 5.0 + i,
                "score_rejected": 1.0}
    if fmt == "transcript":
        return {"id": f"ok{i}", "chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
                "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}", "score_chosen": 2.0, "score_rejected": 1.0}
    return {"id": f"ok{i}", "prompt": q, "all_generated_responses": [a, b, f"maybe {i}"],
            "all_rm_scores": [3.0, 1.0, 2.0]}


# a prompt of ~240 tokens: over the policy's max_length (128) before any response token
LONG_PROMPT = "how to cook a steak? " * 40


def bad_standard():
    v = valid("standard", 0)
    no_prompt = {k: x for k, x in v.items() if k != "prompt"}  # implicit prompt: the responses' common text
    return [
        (no_prompt, "empty prompt (chosen and rejected share no leading text)"),
        (dict(no_prompt, chosen="heat the oven", rejected="heat the oven twice"),
         "one of chosen and rejected is a prefix of the other"),
        (dict(v, id="long", prompt=LONG_PROMPT), "the prompt alone fills max_length"),
        (dict(v, prompt=None), "null field 'prompt'"),
        (dict(v, prompt=""), "empty prompt"),
        (dict(v, chosen=None), "null field 'chosen'"),
        (dict(v, chosen=" \t\n"), "empty chosen response"),
        (dict(v, rejected=""), "empty rejected response"),
        (dict(v, rejected=v["chosen"]), "chosen and rejected responses are identical"),
        (dict(v, score_chosen=float("nan")), "score_chosen is NaN"),
        (dict(v, score_rejected=float("-inf")), "score_rejected is infinite"),
        ({k: x for k, x in v.items() if k != "score_rejected"}, "missing field 'score_rejected'"),
        (dict(v, prompt="long " * 300_000), "over input.max_row_chars"),
        (dict(v, prompt=["not", "a", "string"]), "field 'prompt' must be a string, got list"),
        (dict(v, source=17), "field 'source' does not match the input's type string"),
        (dict(v, unexpected=1), "field 'unexpected' is not among the input's columns"),
        (dict(v, id=None), "missing id field 'id'"),
        (b"\xc3\x28 invalid utf-8", "invalid UTF-8"),
        (b'{"id": "trunc", "prompt": "q"', "invalid JSON"),
        (b"[1, 2, 3]", "row is a JSON list, not an object"),
        (b"42", "row is a JSON int, not an object"),
        (dict(v, id="dup", chosen="first version"), "duplicate pair_id: 2 rows with different content share it"),
        (dict(v, id="dup", chosen="second version"), "duplicate pair_id: 2 rows with different content share it"),
    ]


def bad_conversational():
    v = valid("conversational", 0)
    question = v["chosen"][0]
    return [
        (dict(v, chosen=[m("user", "q"), m("bot", "a")]), "has unknown role 'bot'"),
        (dict(v, chosen=[m("user", "q"), m("assistant", 7)]), "content is not a string"),
        (dict(v, chosen=[{"content": "q"}, m("assistant", "a")]), "is not a {role, content} message"),
        # TRL's implicit prompt is the common leading turns: different questions leave none
        (dict(v, rejected=chat("another question", "b")), "prompts of chosen and rejected differ (no leading turn"),
        (dict(v, chosen=[question, m("user", "a")]), "chosen does not end with an assistant turn"),
        (dict(v, chosen=[]), "must be a non-empty list of messages"),
        (dict(v, chosen=[m("assistant", "a")], rejected=[m("assistant", "b")]),  # and no prompt field
         "prompts of chosen and rejected differ (no leading turn"),
        (dict(v, rejected=v["chosen"] + chat("and then?", "b")), "chosen has no completion after the prompt"),
        (dict(v, id="long", chosen=chat(LONG_PROMPT, "a"), rejected=chat(LONG_PROMPT, "b")),
         "the prompt alone fills max_length"),
        (dict(v, score_chosen="high"), "field 'score_chosen' must be a number, got str"),
    ]


def bad_transcript():
    v = valid("transcript", 0)
    return [
        (dict(v, chosen="\n\nHuman: q only"), "transcript does not end with an Assistant turn"),
        (dict(v, chosen="preamble\n\nHuman: q\n\nAssistant: a"), "text before its first Human/Assistant turn"),
        (dict(v, chosen="\n\nHuman: other\n\nAssistant: a"), "prompts of chosen and rejected differ"),
        (dict(v, rejected=v["rejected"].rsplit(":", 1)[0] + ":"), "empty rejected response"),
        (dict(v, chosen="\n\nAssistant: hi\n\nHuman: q\n\nAssistant: a",
              rejected="\n\nAssistant: hi\n\nHuman: q\n\nAssistant: b"), "transcript does not start with a Human"),
    ]


def bad_candidates():
    v = valid("candidates", 0)
    return [
        (dict(v, all_generated_responses=["same", "same ", "  "], all_rm_scores=[1.0, 2.0, 3.0]),
         "fewer than 2 distinct candidates"),
        (dict(v, all_rm_scores=[1.0, 2.0]), "must be a list as long as all_generated_responses"),
        (dict(v, all_rm_scores=[1.0, None, 2.0]), "field 'all_rm_scores[1]' must be a number, got NoneType"),
        (dict(v, all_rm_scores=[1.0, float("nan"), 2.0]), "all_rm_scores[1] is NaN"),
        (dict(v, all_generated_responses="one response"), "field 'all_generated_responses' must be a list of strings"),
    ]


CORPUS = {"standard": bad_standard, "conversational": bad_conversational, "transcript": bad_transcript,
          "candidates": bad_candidates}


def test_corpus_has_at_least_30_kinds():
    assert sum(len(fn()) for fn in CORPUS.values()) >= 30


@pytest.mark.parametrize("fmt", sorted(CORPUS))
def test_malformed_rows_are_set_aside_with_their_reason(fmt, tmp_path, tiny, local_ray):
    bad = CORPUS[fmt]()
    good = [valid(fmt, i) for i in range(1, 9)]
    lines = [json.dumps(r).encode() for r in good[:4]]
    lines += [row if isinstance(row, bytes) else json.dumps(row).encode() for row, _ in bad]
    lines += [json.dumps(r).encode() for r in good[4:]]
    (tmp_path / f"{fmt}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    model = {"path": tiny["policy"], "max_length": 128, "token_budget": 2048, "cpus_per_actor": 0.5}
    reward = {"source": "model", "model": dict(model, path=tiny["reward"])} if fmt == "transcript" else {}
    cfg = load_config(None, base={
        "input": {"uri": str(tmp_path / f"{fmt}.jsonl"), "format": fmt, "columns": {"id": "id"},
                  "schema_sample_rows": 4},
        "output": str(tmp_path / "out"), "policy": model, "reward": reward, "selection": {"ratio": 0.5},
    })
    manifest = score(cfg)
    counts = manifest["counts"]
    assert counts["input"] == len(lines) == counts["scored"] + counts["rejected"]
    assert counts["scored"] == len(good) and counts["rejected"] == len(bad)
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    # every reason has a code of its own (`mapray.reasons`): none falls through to "other"
    assert all(r["reason_code"] == code_of(r["reason"]) != "other" for r in rejects), rejects
    reasons = sorted(r["reason"] for r in rejects)
    for _, expected in bad:
        match = next((r for r in reasons if expected in r), None)
        assert match is not None, f"no reject with reason {expected!r} in {reasons}"
        reasons.remove(match)
    assert all(r["raw"] for r in rejects)  # the raw row travels with each reject
    scored = pq.read_table(tmp_path / "out" / "scored").column("pair_id").to_pylist()
    assert sorted(scored) == sorted(r["id"] for r in good)


def test_an_input_of_bad_rows_starts_no_model_actor_with_a_cache_and_several_reward_models(tmp_path, tiny,
                                                                                              local_ray):
    """Every line set aside at the normalize step: the model pass runs its stages in light tasks (the policy, the
    reference and both reward models here would fail to load), finds nothing in the cache to count as its own,
    and publishes every line in rejects/."""
    models = {role: unloadable_copy(tiny[role], tmp_path / role) for role in ("policy", "reference", "reward")}
    lines = [b"{not json", json.dumps({"id": "x", "prompt": "q"}).encode(), b"null"]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    model = {"max_length": 128, "token_budget": 2048, "cpus_per_actor": 0.25}
    cfg = load_config(None, base={
        "input": {"uri": str(tmp_path / "bad.jsonl"), "format": "standard", "columns": {"id": "id"}},
        "output": str(tmp_path / "out"), "cache": str(tmp_path / "cache"), "metric": {"implicit": "dpo"},
        "policy": dict(model, path=models["policy"]), "reference": dict(model, path=models["reference"]),
        "reward": {"source": "model", "models": [dict(model, path=models["reward"], name="a"),
                                                 dict(model, path=models["reward"], name="b")]}})
    manifest = score(cfg)
    assert manifest["counts"]["input"] == manifest["counts"]["rejected"] == len(lines)
    assert manifest["counts"]["scored"] == 0 and manifest["from_cache_alone"] == []  # the cache held nothing
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    assert sorted(r["source"].rsplit(":", 1)[1] for r in rejects) == ["1", "2", "3"]
    assert all(r["reason_code"] != "other" for r in rejects)


# issue 9: values no Parquet file holds, anywhere in a row or a file, and valid rows that bad rows must not change.
# The property tests are in tests/test_input_properties.py; these are the issue's own examples and the one run.

def _normalize_lines(fmt: str, lines: list[bytes], sample: list[dict], needs_scores: bool = True) -> pa.Table:
    """The pipeline's JSONL normalize step without Ray: types from `sample`, then the lines."""
    spec = NormalizeSpec(fmt, ColumnNames(), needs_scores=needs_scores, max_row_chars=10**6, own_schema=None)
    spec = replace(spec, own_schema=infer_own_schema(sample, spec))
    table = pa.table({"_m_line": pa.array(lines, pa.binary()), C.SOURCE: [f"f:{i}" for i in range(len(lines))]})
    return Normalizer(spec)(table)


def uf_row(i: int, score=8.0) -> dict:
    q = f"How did the abacus calculate numbers {i}?"
    return {"prompt": q, "chosen": chat(q, f"beads {i}"), "rejected": chat(q, "magic"), "score_chosen": score,
            "score_rejected": 3.5}


def test_bad_rows_in_the_sample_leave_valid_columns_as_they_were():
    """The issue's rows: bad rows holding a list prompt, a string chosen and a string score among the first rows
    used to turn prompt into '"How did ..."', chosen into JSON text and 8.0 into '8.0' for every row."""
    bad = {"prompt": ["not", "text"], "chosen": "a string", "rejected": 7, "score_chosen": "high",
           "score_rejected": "low"}
    rows = [bad, uf_row(0), bad, uf_row(1), bad, bad, uf_row(2)]
    out = _normalize_lines("conversational", [json.dumps(r).encode() for r in rows], rows)
    good = [i for i, r in enumerate(out.column("_m_reject").to_pylist()) if r is None]
    assert good == [1, 3, 6]
    assert out.schema.field("prompt").type == "string" and out.schema.field("score_chosen").type == "double"
    assert str(out.schema.field("chosen").type) == "list<item: struct<role: string, content: string>>"
    for i in good:
        assert {k: out.column(k)[i].as_py() for k in rows[i]} == rows[i]


def test_a_lone_surrogate_anywhere_sets_its_row_aside_with_its_line():
    surrogate = dict(valid("standard", 0), prompt="\ud800x")  # valid JSON: "\ud800x"
    rows = [surrogate, valid("standard", 1), dict(valid("standard", 2), source={"k": ["\udfff"]}),
            {**valid("standard", 3), "\udc00": 1}]
    lines = [json.dumps(r).encode() for r in rows]  # ensure_ascii: the surrogates as \u escapes, as in the issue
    uri = "memory://bad-input/surrogates.jsonl"
    with fsspec.open(uri, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    sample = sample_records(InputFiles([uri], "jsonl", None, [uri]), 10)  # the first row used to stop the driver
    assert len(sample) == 4
    out = _normalize_lines("standard", lines, sample)
    reasons = out.column("_m_reject").to_pylist()
    assert reasons[0] == "field 'prompt' holds a lone UTF-16 surrogate, which UTF-8 cannot encode"
    assert reasons[1] is None
    assert reasons[2] == "field 'source' holds a lone UTF-16 surrogate, which UTF-8 cannot encode"
    assert reasons[3] == "field name '\\udc00' holds a lone UTF-16 surrogate, which UTF-8 cannot encode"
    raw = out.column("_m_raw").to_pylist()
    assert raw[0] == lines[0].decode() and json.loads(raw[0]) == surrogate  # escapes kept: parses back the same


def test_raw_json_escapes_lone_surrogates():
    text = raw_json({"p\udc00": ["\ud800x", 1]})
    assert text == '{"p\\udc00": ["\\ud800x", 1]}' and text.encode("utf-8")
    assert json.loads(text) == {"p\udc00": ["\ud800x", 1]}


def test_a_column_null_in_the_sample_and_columns_arrow_cannot_type():
    """Null in every sampled row: float64 for the score columns, string otherwise, and a later value of another
    type sets its row aside (never JSON text). Only a column Arrow has no type for is JSON text, marked so."""
    first = [dict(valid("standard", i), note=None, score_chosen=None, score_rejected=None, meta={},
                  mixed=[1, "a"]) for i in range(3)]
    later = [dict(valid("standard", 5), note="a note", meta={"k": 1}, mixed="x"),
             dict(valid("standard", 6), note=17)]
    out = _normalize_lines("standard", [json.dumps(r).encode() for r in first + later], first, needs_scores=False)
    schema = out.schema
    assert schema.field("note").type == "string" and schema.field("score_chosen").type == "double"
    assert schema.field("meta").metadata == {b"json": b"1"} and schema.field("mixed").metadata == {b"json": b"1"}
    assert schema.field("prompt").metadata is None
    rows = out.to_pylist()
    assert rows[3]["_m_reject"] is None and rows[3]["note"] == "a note" and rows[3]["score_chosen"] == 10.0
    assert json.loads(rows[3]["meta"]) == {"k": 1} and json.loads(rows[3]["mixed"]) == "x"
    assert rows[4]["_m_reject"].startswith("field 'note' does not match the input's type string: it holds a number")


def test_generated_bad_values_never_stop_a_run(tmp_path, tiny, local_ray):
    """One run over a file with a value of every troublesome kind mixed among valid rows, the first line a lone
    surrogate (it used to stop the driver's sample): the run completes, input = scored + rejected, every bad row
    is in rejects/ with its reason and its line, every valid row's own columns come back as they were."""
    base = valid("standard", 0)
    goods = [dict(valid("standard", i), prompt=f"NUL \x00 and \U0001f600 {i}", tags=["a", str(i)], meta={"k": i},
                  rating=i + 0.5 if i % 2 else i, note=None) for i in range(1, 7)]
    bads = [
        (encode_row(dict(base, prompt="\ud800x")), "lone UTF-16 surrogate"),
        (encode_row(dict(base, id="b1", meta={"k": ["\udfff"]})), "field 'meta' holds a lone UTF-16 surrogate"),
        (encode_row({**base, "id": "b2", "k\udc00": 1}), "field name 'k\\udc00' holds a lone UTF-16 surrogate"),
        (encode_row(dict(base, id="b3", rating=2**64)), "field 'rating' holds an integer outside"),
        (encode_row(dict(base, id="b4", score_chosen=10**400)), "field 'score_chosen' holds an integer outside"),
        (encode_row(dict(base, id="b5", meta=json.loads("[" * 40 + "]" * 40))), "nested deeper than 32 levels"),
        (b'{"id": "b6", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid JSON (nested too deeply"),
        (b"null", "row is a JSON null, not an object"),
        (b'"\\ud800"', "row is a JSON str, not an object"),
        (b"{}", "missing field"),
        (encode_row({k: None for k in base}), "null field"),
        (encode_row(dict(base, id="b7", tags="not a list")), "field 'tags' does not match the input's type"),
        (json.dumps(dict(base, id="b8", prompt="\udc00"), ensure_ascii=False).encode("utf-8", "surrogatepass"),
         "invalid UTF-8"),
    ]
    lines = [bads[0][0]] + [encode_row(r) for r in goods[:3]] + [b for b, _ in bads[1:]] + [
        encode_row(r) for r in goods[3:]]
    (tmp_path / "gen.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    model = {"path": tiny["policy"], "max_length": 128, "token_budget": 2048, "cpus_per_actor": 0.5}
    cfg = load_config(None, base={
        "input": {"uri": str(tmp_path / "gen.jsonl"), "format": "standard", "columns": {"id": "id"},
                  "schema_sample_rows": 8},
        "output": str(tmp_path / "out"), "policy": model, "reward": {"source": "columns"},
        "selection": {"ratio": 0.5},
    })
    counts = score(cfg)["counts"]
    assert counts["input"] == len(lines) == counts["scored"] + counts["rejected"]
    assert (counts["scored"], counts["rejected"]) == (len(goods), len(bads))
    rejects = {int(r["source"].rsplit(":", 1)[1]): r for r in pq.read_table(tmp_path / "out" / "rejects").to_pylist()}
    bad_numbers = [1] + list(range(5, 5 + len(bads) - 1))
    assert sorted(rejects) == bad_numbers
    for number, (line, reason) in zip(bad_numbers, bads):
        assert reason in rejects[number]["reason"], (number, rejects[number]["reason"])
        assert rejects[number]["reason_code"] != "other", rejects[number]["reason"]
        assert rejects[number]["raw"] == line.decode("utf-8", errors="backslashreplace")
    scored = {r["pair_id"]: r for r in pq.read_table(tmp_path / "out" / "scored").to_pylist()}
    for row in goods:
        for name in ("tags", "meta", "rating", "note", "score_chosen", "source"):
            assert scored[row["id"]][name] == row[name], name
    types = pq.read_schema(next((tmp_path / "out" / "scored").glob("*.parquet")))
    assert types.field("rating").type == pa.float64() and types.field("tags").type.value_type == pa.string()


def encode_row(row: dict) -> bytes:
    return json.dumps(row).encode()  # ensure_ascii: lone surrogates travel as \u escapes, valid JSON
