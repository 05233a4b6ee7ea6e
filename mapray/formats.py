"""Every input format -> one canonical pair, or a specific reason to set the row aside.

Pure Python, no Ray: `normalize_record` takes one input row (a dict) and returns a `Pair` or raises
`RejectRow` whose message is the reason written to `rejects/`.

Formats (`input.format`):
- text: `prompt`, `chosen`, `rejected` strings.
- chat: `chosen` / `rejected` are lists of {role, content}; the shared prefix before the last (assistant) turn is
  the prompt. When both lists hold only the assistant turn, the `prompt` column becomes the user turn.
- transcript: Anthropic HH style "\\n\\nHuman: ...\\n\\nAssistant: ..." texts; the prompt is everything before the
  last "\\n\\nAssistant:", turned into user/assistant messages.
- candidates: `prompt` plus a list of responses and (optionally) a list of scores. With scores the pair is
  picked here; without, the reward stage scores every candidate and picks it (see `pick_pair`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from mapray.config import ColumnNames

ROLES = ("system", "user", "assistant")
_TURN = re.compile(r"\n\n(Human|Assistant):")


class RejectRow(ValueError):
    """The row cannot be scored; the message says why, in a few words naming the field."""


@dataclass
class Pair:
    pair_id: str
    prompt: list[dict]  # chat messages, ending with a user (or system) turn
    chosen: str | None  # None for unscored candidates, until the reward stage picks the pair
    rejected: str | None
    score_chosen: float | None = None
    score_rejected: float | None = None
    candidates: list[str] | None = None  # unscored N-candidates rows only


def detect_format(sample: dict, cols: ColumnNames) -> str:
    """Guesses the format from one representative row's fields."""
    if cols.responses in sample:
        return "candidates"
    chosen = sample.get(cols.chosen)
    if isinstance(chosen, list):
        return "chat"
    if isinstance(chosen, str) and isinstance(sample.get(cols.prompt), str):
        return "text"
    if isinstance(chosen, str) and "\n\nAssistant:" in chosen:
        return "transcript"
    raise RejectRow(f"cannot detect the input format from fields {sorted(sample)}; set input.format")


def normalize_record(rec: dict, fmt: str, cols: ColumnNames) -> Pair:
    if fmt == "text":
        pair = _from_text(rec, cols)
    elif fmt == "chat":
        pair = _from_chat(rec, cols)
    elif fmt == "transcript":
        pair = _from_transcript(rec, cols)
    elif fmt == "candidates":
        pair = _from_candidates(rec, cols)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    pair.pair_id = _pair_id(rec, pair, cols)
    return pair


def _from_text(rec: dict, cols: ColumnNames) -> Pair:
    prompt = _string(rec, cols.prompt, "prompt")
    chosen, rejected = _responses(_string(rec, cols.chosen), _string(rec, cols.rejected))
    sc, sr = _scores(rec, cols)
    return Pair("", [{"role": "user", "content": prompt}], chosen, rejected, sc, sr)


def _from_chat(rec: dict, cols: ColumnNames) -> Pair:
    chosen_msgs = _messages(rec, cols.chosen)
    rejected_msgs = _messages(rec, cols.rejected)
    for name, msgs in ((cols.chosen, chosen_msgs), (cols.rejected, rejected_msgs)):
        if msgs[-1]["role"] != "assistant":
            raise RejectRow(f"{name} does not end with an assistant turn")
    prompt = chosen_msgs[:-1]
    if prompt != rejected_msgs[:-1]:
        raise RejectRow("prompts of chosen and rejected differ")
    if not prompt:
        prompt = [{"role": "user", "content": _string(rec, cols.prompt, "prompt")}]
    _check_prompt(prompt)
    chosen, rejected = _responses(chosen_msgs[-1]["content"], rejected_msgs[-1]["content"])
    sc, sr = _scores(rec, cols)
    return Pair("", prompt, chosen, rejected, sc, sr)


def _from_transcript(rec: dict, cols: ColumnNames) -> Pair:
    chosen_prompt, chosen = split_transcript(_string(rec, cols.chosen))
    rejected_prompt, rejected = split_transcript(_string(rec, cols.rejected))
    if chosen_prompt != rejected_prompt:
        raise RejectRow("prompts of chosen and rejected differ")
    chosen, rejected = _responses(chosen, rejected)
    sc, sr = _scores(rec, cols)
    return Pair("", chosen_prompt, chosen, rejected, sc, sr)


def split_transcript(text: str) -> tuple[list[dict], str]:
    """Splits an HH transcript into prompt messages and the last assistant response."""
    parts = _TURN.split(text)
    # parts = [preamble, speaker, text, speaker, text, ...]
    if len(parts) < 3 or parts[-2] != "Assistant":
        raise RejectRow("transcript does not end with an Assistant turn")
    if parts[0].strip():
        raise RejectRow("transcript has text before its first Human/Assistant turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[s], "content": t.strip()} for s, t in zip(parts[1:-2:2], parts[2:-2:2])]
    if not messages or messages[0]["role"] != "user":
        raise RejectRow("transcript does not start with a Human turn")
    _check_prompt(messages)
    return messages, parts[-1].strip()


def _from_candidates(rec: dict, cols: ColumnNames) -> Pair:
    prompt = [{"role": "user", "content": _string(rec, cols.prompt, "prompt")}]
    responses = rec.get(cols.responses)
    if not isinstance(responses, list):
        raise RejectRow(_type_reason(cols.responses, responses, "a list of strings"))
    if not all(isinstance(r, str) for r in responses):
        raise RejectRow(f"{cols.responses} holds a non-string response")
    scores = rec.get(cols.scores)
    if scores is None:
        candidates = _distinct(responses, range(len(responses)))
        if len(candidates) < 2:
            raise RejectRow("fewer than 2 distinct candidates")
        return Pair("", prompt, None, None, candidates=[responses[i] for i in candidates])
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise RejectRow(f"{cols.scores} must be a list as long as {cols.responses}")
    values = [_finite(s, f"{cols.scores}[{i}]") for i, s in enumerate(scores)]
    best, worst = pick_pair(responses, values)
    return Pair("", prompt, responses[best], responses[worst], values[best], values[worst])


def pick_pair(responses: list[str], scores: list[float]) -> tuple[int, int]:
    """Indices of (chosen, rejected) among scored candidates.

    Deterministic ties: empty and duplicate responses are ignored (first occurrence kept); chosen is the first
    candidate with the highest score, rejected the last one with the lowest score among the others.
    """
    keep = _distinct(responses, range(len(responses)))
    if len(keep) < 2:
        raise RejectRow("fewer than 2 distinct candidates")
    best = max(keep, key=lambda i: (scores[i], -i))
    rest = [i for i in keep if i != best]
    worst = min(rest, key=lambda i: (scores[i], -i))
    return best, worst


def _distinct(responses: list[str], indices) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i in indices:
        text = responses[i].strip()
        if text and text not in seen:
            seen.add(text)
            keep.append(i)
    return keep


def _string(rec: dict, name: str, what: str | None = None) -> str:
    if name not in rec:
        raise RejectRow(f"missing field '{name}'")
    value = rec[name]
    if value is None:
        raise RejectRow(f"null field '{name}'")
    if not isinstance(value, str):
        raise RejectRow(_type_reason(name, value, "a string"))
    if what == "prompt" and not value.strip():
        raise RejectRow("empty prompt")
    return value


def _messages(rec: dict, name: str) -> list[dict]:
    if name not in rec:
        raise RejectRow(f"missing field '{name}'")
    msgs = rec[name]
    if msgs is None:
        raise RejectRow(f"null field '{name}'")
    if not isinstance(msgs, list) or not msgs:
        raise RejectRow(_type_reason(name, msgs, "a non-empty list of messages"))
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RejectRow(f"{name}[{i}] is not a {{role, content}} message")
        if m["role"] not in ROLES:
            raise RejectRow(f"{name}[{i}] has unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise RejectRow(f"{name}[{i}] content is not a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_prompt(messages: list[dict]) -> None:
    if messages[-1]["role"] == "assistant":
        raise RejectRow("prompt ends with an assistant turn")
    if not any(m["content"].strip() for m in messages):
        raise RejectRow("empty prompt")


def _responses(chosen: str, rejected: str) -> tuple[str, str]:
    if not chosen.strip():
        raise RejectRow("empty chosen response")
    if not rejected.strip():
        raise RejectRow("empty rejected response")
    if chosen == rejected:
        raise RejectRow("chosen and rejected responses are identical")
    return chosen, rejected


def _scores(rec: dict, cols: ColumnNames) -> tuple[float | None, float | None]:
    """Explicit scores when the row has them; a row with only one of the two is rejected."""
    present = [rec.get(cols.score_chosen) is not None, rec.get(cols.score_rejected) is not None]
    if not any(present):
        return None, None
    if not all(present):
        missing = cols.score_chosen if not present[0] else cols.score_rejected
        raise RejectRow(f"missing field '{missing}'")
    return _finite(rec[cols.score_chosen], cols.score_chosen), _finite(rec[cols.score_rejected], cols.score_rejected)


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RejectRow(_type_reason(name, value, "a number"))
    if math.isnan(value):
        raise RejectRow(f"{name} is NaN")
    if math.isinf(value):
        raise RejectRow(f"{name} is infinite")
    return float(value)


def _type_reason(name: str, value, expected: str) -> str:
    return f"field '{name}' must be {expected}, got {type(value).__name__}"


def _pair_id(rec: dict, pair: Pair, cols: ColumnNames) -> str:
    if cols.id is not None:
        value = rec.get(cols.id)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RejectRow(f"missing id field '{cols.id}'")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise RejectRow(_type_reason(cols.id, value, "a string or integer id"))
        return str(value)
    content = [pair.prompt, pair.chosen, pair.rejected, pair.candidates]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:24]
