import json

import pyarrow as pa
import pytest

from mapray import columns as C
from mapray.config import ColumnNames
from mapray.formats import RejectRow, detect_format, normalize_record, pick_pair, split_transcript
from mapray.normalize import Normalizer, NormalizeSpec, infer_own_schema
from mapray.reasons import code_of
from tests.conftest import HH, UF

COLS = ColumnNames()
U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def test_standard_explicit_pair():
    p = normalize_record({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, "standard", COLS)
    assert (p.prompt, p.chosen, p.rejected) == ("Hi?", "Hello.", "Go away.") and not p.conversational
    assert p.score_chosen is None and len(p.pair_id) == 24


def test_standard_implicit_prompt_is_trl_extract_prompt():
    from trl.data_utils import extract_prompt

    rec = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    p = normalize_record(rec, "standard", COLS)
    assert (p.prompt, p.chosen, p.rejected) == ("The sky is", " blue.", " green.")  # the space goes back
    assert extract_prompt(rec) == {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}


def test_conversational_with_scores_and_id():
    rec = {"prompt_id": "x1", "prompt": "Q", "chosen": [msg(U, "Q"), msg(A, "good")],
           "rejected": [msg(U, "Q"), msg(A, "bad")], "score_chosen": 8.0, "score_rejected": 3}
    p = normalize_record(rec, "conversational", ColumnNames(id="prompt_id"))
    assert (p.pair_id, p.prompt, p.chosen, p.rejected) == ("x1", [msg(U, "Q")], [msg(A, "good")], [msg(A, "bad")])
    assert (p.score_chosen, p.score_rejected) == (8.0, 3.0) and p.conversational


def test_conversational_explicit_prompt_with_system_and_tool_turns():
    prompt = [msg("system", "be brief"), msg(U, "weather?"), msg(A, "calling"), msg("tool", "sunny"), msg(U, "so?")]
    rec = {"prompt": prompt, "chosen": [msg(A, "It is sunny.")], "rejected": [msg(A, "No idea.")]}
    p = normalize_record(rec, "conversational", COLS)
    assert (p.prompt, p.chosen, p.rejected) == (prompt, rec["chosen"], rec["rejected"])


def test_conversational_implicit_prompt_is_trl_extract_prompt():
    from trl.data_utils import extract_prompt

    rec = {"chosen": [msg(U, "q"), msg(A, "a1"), msg(U, "q2"), msg(A, "long")],
           "rejected": [msg(U, "q"), msg(A, "a1"), msg(U, "q2"), msg(A, "no")]}
    p = normalize_record(rec, "conversational", COLS)
    assert extract_prompt(rec) == {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
    assert p.prompt == rec["chosen"][:3]


def test_conversational_assistant_only_uses_prompt_column():
    rec = {"prompt": "Q", "chosen": [msg(A, "good")], "rejected": [msg(A, "bad")]}
    assert normalize_record(rec, "conversational", COLS).prompt == [msg(U, "Q")]


def test_transcript_split_multi_turn():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen joke?\n\nAssistant: Sure, here is one."
    prompt, response = split_transcript(text)
    assert prompt == [msg(U, "hi"), msg(A, "hello"), msg(U, "a pen joke?")]
    assert response == "Sure, here is one."


def test_candidates_with_scores_and_tie_rule():
    rec = {"prompt": "Q", "all_generated_responses": ["a", "b", "c", "b", ""], "all_rm_scores": [1, 5, 1, 9, 9]}
    p = normalize_record(rec, "candidates", COLS)
    # the duplicate "b" and the empty candidate are ignored; max = b (5); min among others: last of ties = c
    assert (p.chosen, p.rejected, p.score_chosen, p.score_rejected) == ([msg(A, "b")], [msg(A, "c")], 5.0, 1.0)
    assert p.candidates == rec["all_generated_responses"] and p.candidate_scores == [1.0, 5.0, 1.0, 9.0, 9.0]
    assert pick_pair(["x", "y", "z"], [2.0, 2.0, 2.0]) == (0, 2)


def test_candidates_without_scores_wait_for_the_reward_stage():
    p = normalize_record({"prompt": "Q", "all_generated_responses": ["a", "b", "a"]}, "candidates", COLS)
    assert p.chosen is None and p.candidates == ["a", "b", "a"] and p.prompt == [msg(U, "Q")]


def test_detect_format_by_trl_rules():
    assert detect_format({"prompt": "q", "chosen": [msg(U, "q"), msg(A, "a")], "rejected": []}, COLS) == \
        "conversational"
    assert detect_format({"prompt": [msg(U, "q")], "chosen": [msg(A, "a")], "rejected": []}, COLS) == \
        "conversational"
    assert detect_format({"chosen": [msg(U, "q"), msg(A, "a")]}, COLS) == "conversational"
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}, COLS) == "standard"
    assert detect_format({"chosen": "The sky is blue.", "rejected": "The sky is red."}, COLS) == "standard"
    assert detect_format({"chosen": "\n\nHuman: q\n\nAssistant: a"}, COLS) == "transcript"
    assert detect_format({"prompt": "q", "all_generated_responses": []}, COLS) == "candidates"
    with pytest.raises(RejectRow, match="cannot detect"):
        detect_format({"foo": 1}, COLS)


REJECTS = [
    ("standard", {"chosen": "a", "rejected": "b"}, "empty prompt (chosen and rejected share no leading text)"),
    ("standard", {"chosen": "same", "rejected": "same, longer"}, "one of chosen and rejected is a prefix"),
    ("standard", {"prompt": None, "chosen": "a", "rejected": "b"}, "null field 'prompt'"),
    ("standard", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ("standard", {"prompt": "q", "chosen": ["a"], "rejected": "b"}, "field 'chosen' must be a string, got list"),
    ("standard", {"prompt": "q", "chosen": " \n", "rejected": "b"}, "empty chosen response"),
    ("standard", {"prompt": "q", "chosen": "a", "rejected": ""}, "empty rejected response"),
    ("standard", {"prompt": "q", "chosen": "a", "rejected": "a"}, "chosen and rejected responses are identical"),
    ("standard", {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": float("nan"), "score_rejected": 1},
     "score_chosen is NaN"),
    ("standard", {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": float("inf")},
     "score_rejected is infinite"),
    ("standard", {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 10**400, "score_rejected": 1},
     "score_chosen is infinite"),
    ("standard", {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "9", "score_rejected": 1},
     "field 'score_chosen' must be a number, got str"),
    ("standard", {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1}, "missing field 'score_rejected'"),
    ("conversational", {"chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "Q"), msg(A, "b")]},
     "prompts of chosen and rejected differ"),
    ("conversational", {"prompt": "q", "chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "Q"), msg(A, "b")]},
     "prompts of chosen and rejected differ"),
    ("conversational", {"chosen": [msg(U, "q"), msg("bot", "a")], "rejected": [msg(U, "q"), msg(A, "b")]},
     "chosen[1] has unknown role 'bot'"),
    ("conversational", {"chosen": [msg(U, "q"), msg(A, 5)], "rejected": [msg(U, "q"), msg(A, "b")]},
     "chosen[1] content is not a string"),
    ("conversational", {"chosen": [msg(U, "q"), msg(U, "a")], "rejected": [msg(U, "q"), msg(A, "b")]},
     "chosen does not end with an assistant turn"),
    ("conversational", {"chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "q"), msg(A, "a")]},
     "chosen has no completion after the prompt"),
    ("conversational", {"prompt": [msg(U, "q"), msg(A, "x")], "chosen": [msg(A, "a")], "rejected": [msg(A, "b")]},
     "prompt ends with an assistant turn"),
    ("conversational", {"chosen": [], "rejected": [msg(U, "q"), msg(A, "b")]},
     "field 'chosen' must be a non-empty list"),
    ("conversational", {"chosen": ["hi"], "rejected": [msg(U, "q"), msg(A, "b")]},
     "chosen[0] is not a {role, content}"),
    ("transcript", {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q"},
     "transcript does not end with an Assistant turn"),
    ("transcript", {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q2\n\nAssistant: b"},
     "prompts of chosen and rejected differ"),
    ("transcript", {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
     "empty chosen response"),
    ("candidates", {"prompt": "q", "all_generated_responses": ["a", "a", " "], "all_rm_scores": [1, 2, 3]},
     "fewer than 2 distinct candidates"),
    ("candidates", {"prompt": "q", "all_generated_responses": ["a", "b"], "all_rm_scores": [1]},
     "all_rm_scores must be a list as long as all_generated_responses"),
    ("candidates", {"prompt": "q", "all_generated_responses": ["a", "b"], "all_rm_scores": [1, None]},
     "field 'all_rm_scores[1]' must be a number, got NoneType"),
    ("candidates", {"prompt": "q", "all_generated_responses": "a"}, "must be a list of strings"),
]


@pytest.mark.parametrize("fmt,rec,reason", REJECTS, ids=[r[2][:40] for r in REJECTS])
def test_reject_reasons(fmt, rec, reason):
    with pytest.raises(RejectRow) as info:
        normalize_record(rec, fmt, COLS)
    assert reason in str(info.value)
    assert code_of(str(info.value)) != "other"  # each reason has its stable code (mapray.reasons)


def test_missing_configured_id():
    with pytest.raises(RejectRow, match="missing id field 'uid'"):
        normalize_record({"prompt": "q", "chosen": "a", "rejected": "b"}, "standard", ColumnNames(id="uid"))


def _lines_table(lines: list[bytes]) -> pa.Table:
    return pa.table({"_m_line": pa.array(lines, pa.binary()),
                     C.SOURCE: [f"f.jsonl:{i + 1}" for i in range(len(lines))]})


def test_real_hh_rows_set_aside_with_reasons():
    lines = HH.read_bytes().splitlines()
    rows = [json.loads(x) for x in lines]
    # the real defect in this file: line 87 has an empty chosen response after the last "Assistant:";
    # plus a real-world mismatch: chosen of one conversation paired with rejected of another
    mixed = {"chosen": rows[0]["chosen"], "rejected": rows[1]["rejected"]}
    spec = NormalizeSpec("transcript", COLS, needs_scores=False, max_row_chars=10**6,
                         own_schema=infer_own_schema(rows[:50]))
    out = Normalizer(spec)(_lines_table(lines + [json.dumps(mixed).encode()]))
    assert out.num_rows == 501  # nothing dropped
    reasons = out.column(C.REJECT).to_pylist()
    assert reasons[86] == "empty chosen response"
    assert reasons[500] == "prompts of chosen and rejected differ"
    assert sum(r is not None for r in reasons) == 2
    good = out.filter(pa.compute.is_null(out.column(C.REJECT)))
    assert good.column("chosen").to_pylist()[0] == rows[0]["chosen"]  # the input's own columns kept
    raw = out.column(C.RAW).to_pylist()
    assert json.loads(raw[86]) == rows[86] and json.loads(raw[500]) == mixed  # raw row kept with each reject
    assert raw[0] is None


def test_jsonl_line_failures_and_type_mismatch():
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 2.0, "score_rejected": 1.0}
    lines = [json.dumps(good).encode(), b"\xff\xfe not utf8", b"{not json", b"[1, 2]",
             json.dumps(dict(good, score_chosen="high")).encode(),
             json.dumps(dict(good, extra_field=1)).encode(),
             json.dumps({k: v for k, v in good.items() if k != "score_chosen"}).encode()]
    spec = NormalizeSpec("standard", COLS, needs_scores=True, max_row_chars=10**6,
                         own_schema=infer_own_schema([good]))
    out = Normalizer(spec)(_lines_table(lines))
    reasons = out.column(C.REJECT).to_pylist()
    assert reasons[0] is None
    assert reasons[1] == "invalid UTF-8"
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "row is a JSON list, not an object"
    assert reasons[4] == "field 'score_chosen' must be a number, got str"
    assert reasons[5].startswith("field 'extra_field' is not among the input's columns")
    assert reasons[6] == "missing field 'score_rejected' (reward.source=columns needs explicit scores)" or \
        reasons[6].startswith("missing field 'score_chosen'")
    assert out.column(C.RAW).to_pylist()[1] == "\\xff\\xfe not utf8"
    assert out.column(C.SOURCE).to_pylist()[2] == "f.jsonl:3"


def test_real_ultrafeedback_rows_normalize():
    lines = UF.read_bytes().splitlines()[:200]
    sample = [json.loads(x) for x in lines]
    spec = NormalizeSpec("conversational", ColumnNames(id="prompt_id"), True, 10**6, infer_own_schema(sample))
    out = Normalizer(spec)(_lines_table(lines))
    assert out.column(C.REJECT).null_count == 200
    assert out.column(C.PAIR_ID).to_pylist() == [s["prompt_id"] for s in sample]
    assert json.loads(out.column(C.PROMPT)[0].as_py()) == [msg(U, sample[0]["prompt"])]
    assert out.column(C.SCORE_CHOSEN).to_pylist() == [s["score_chosen"] for s in sample]
