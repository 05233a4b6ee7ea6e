"""A corpus of malformed rows of every input format, mixed into valid data and run through the whole pipeline:
no crash, every bad row in rejects/ with its specific reason, input = scored + rejected."""

import json

import pyarrow.parquet as pq
import pytest

from mapray.config import load_config
from mapray.pipeline import score


def m(role, content):
    return {"role": role, "content": content}


def chat(prompt, answer):
    return [m("user", prompt), m("assistant", answer)]


def valid(fmt: str, i: int) -> dict:
    q, a, b = f"question {i}: how to cook a steak?", f"heat the oven {i}", f"no idea {i}"
    if fmt == "text":
        return {"id": f"ok{i}", "prompt": q, "chosen": a, "rejected": b, "score_chosen": 5.0 + i,
                "score_rejected": 1.0, "source": "web"}
    if fmt == "chat":
        return {"id": f"ok{i}", "chosen": chat(q, a), "rejected": chat(q, b), "score_chosen": 5.0 + i,
                "score_rejected": 1.0}
    if fmt == "transcript":
        return {"id": f"ok{i}", "chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
                "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}", "score_chosen": 2.0, "score_rejected": 1.0}
    return {"id": f"ok{i}", "prompt": q, "all_generated_responses": [a, b, f"maybe {i}"],
            "all_rm_scores": [3.0, 1.0, 2.0]}


def bad_text():
    v = valid("text", 0)
    return [
        ({k: x for k, x in v.items() if k != "prompt"}, "missing field 'prompt'"),
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


def bad_chat():
    v = valid("chat", 0)
    return [
        (dict(v, chosen=[m("user", "q"), m("bot", "a")]), "has unknown role 'bot'"),
        (dict(v, chosen=[m("user", "q"), m("assistant", 7)]), "content is not a string"),
        (dict(v, chosen=[{"content": "q"}, m("assistant", "a")]), "is not a {role, content} message"),
        (dict(v, rejected=chat("another question", "b")), "prompts of chosen and rejected differ"),
        (dict(v, chosen=[m("user", "q"), m("user", "a")]), "chosen does not end with an assistant turn"),
        (dict(v, chosen=[]), "must be a non-empty list of messages"),
        (dict(v, chosen=[m("assistant", "a")], rejected=[m("assistant", "b")]), "missing field 'prompt'"),
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


CORPUS = {"text": bad_text, "chat": bad_chat, "transcript": bad_transcript, "candidates": bad_candidates}


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
    reasons = sorted(r["reason"] for r in rejects)
    for _, expected in bad:
        match = next((r for r in reasons if expected in r), None)
        assert match is not None, f"no reject with reason {expected!r} in {reasons}"
        reasons.remove(match)
    assert all(r["raw"] for r in rejects)  # the raw row travels with each reject
    scored = pq.read_table(tmp_path / "out" / "scored").column("pair_id").to_pylist()
    assert sorted(scored) == sorted(r["id"] for r in good)
