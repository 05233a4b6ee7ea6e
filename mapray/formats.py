"""Every input format -> one canonical pair, or a specific reason to set the row aside.

Pure Python, no Ray: `normalize_record` takes one input row (a dict) and returns a `Pair` or raises
`RejectRow` whose message is the reason written to `rejects/`. (Over 300 lines: the four readers share their field
checks and reasons, and a reason read beside its siblings is the one a user will see.)

The pair is TRL's explicit-prompt form (`trl/docs/source/dataset_formats.md`), standard or conversational:
- standard: `prompt`, `chosen`, `rejected` strings. Without a `prompt` field the prompt is implicit: the longest
  common leading text of chosen and rejected (TRL's `extract_prompt`, which gives a trailing space back to the
  responses). Scored as plain text, no chat template (see `mapray.templates`).
- conversational: `chosen` / `rejected` lists of {role, content} messages (roles system, user, assistant, tool).
  With a `prompt` message list the prompt is explicit and chosen/rejected are the completions; without one, the
  prompt is the longest common leading run of turns (TRL's `extract_prompt`). A `prompt` *string* beside full
  conversations (UltraFeedback-binarized) is a copy of the first user turn: ignored, except that when chosen and
  rejected hold only the assistant turn it becomes the user turn.
- transcript: Anthropic HH "\\n\\nHuman: ...\\n\\nAssistant: ..." texts -> conversational; the prompt is everything
  before the last "\\n\\nAssistant:".
- candidates: a prompt (string: one user turn, or messages) plus a list of responses and optionally a list of scores
  -> conversational. With scores the pair is picked here; without, the reward stage scores every candidate and
  picks it (`pick_pair`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from mapray.config import ColumnNames

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("standard", "conversational", "transcript", "candidates")
_TURN = re.compile(r"\n\n(Human|Assistant):")

Messages = list[dict]


class RejectRow(ValueError):
    """The row cannot be scored; the message says why, in a few words naming the field."""


@dataclass
class Pair:
    pair_id: str
    prompt: str | Messages  # standard: text; conversational: messages ending with a non-assistant turn
    chosen: str | Messages | None  # a completion: text, or messages; None for candidates until rewards pick it
    rejected: str | Messages | None
    score_chosen: float | None = None
    score_rejected: float | None = None
    candidates: list[str] | None = None  # N-candidates rows: every response, aligned with the input's list
    candidate_scores: list[float | None] | None = None  # the input's scores, aligned; None where ignored

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def text_size(self) -> int:
        """Characters of text in the pair (prompt, responses, candidates)."""
        parts = [self.prompt, self.chosen, self.rejected, *(self.candidates or [])]
        return sum(len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p) for p in parts if p)


def assistant(text: str) -> Messages:
    """A response text as a conversational completion."""
    return [{"role": "assistant", "content": text}]


def detect_format(sample: dict, cols: ColumnNames) -> str:
    """The format of a representative row, by TRL's rules (`is_conversational`, then explicit vs implicit
    prompt), with mapray's own transcript and candidates formats first."""
    if cols.responses in sample:
        return "candidates"
    chosen = sample.get(cols.chosen)
    if any(_looks_like_messages(sample.get(name)) for name in (cols.prompt, cols.chosen, cols.rejected)):
        return "conversational"
    if isinstance(chosen, str) and cols.prompt not in sample and "\n\nAssistant:" in chosen:
        return "transcript"
    if isinstance(chosen, str):
        return "standard"
    raise RejectRow(f"cannot detect the input format from fields {sorted(sample)}; set input.format")


def _looks_like_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def normalize_record(rec: dict, fmt: str, cols: ColumnNames) -> Pair:
    readers = {"standard": _from_standard, "conversational": _from_conversational,
               "transcript": _from_transcript, "candidates": _from_candidates}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}")
    pair = readers[fmt](rec, cols)
    pair.pair_id = _pair_id(rec, pair, cols)
    return pair


def _from_standard(rec: dict, cols: ColumnNames) -> Pair:
    chosen, rejected = _string(rec, cols.chosen), _string(rec, cols.rejected)
    if cols.prompt in rec:
        prompt = _string(rec, cols.prompt, "prompt")
    else:
        prompt, chosen, rejected = extract_text_prompt(chosen, rejected)
        if not prompt.strip():
            raise RejectRow("empty prompt (chosen and rejected share no leading text)")
    _check_responses(chosen, rejected)
    return Pair("", prompt, chosen, rejected, *_scores(rec, cols))


def extract_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's `extract_prompt` on strings: the longest common prefix, minus a trailing space that goes back to the
    responses."""
    idx = 0
    while idx < min(len(chosen), len(rejected)) and chosen[idx] == rejected[idx]:
        idx += 1
    if idx == min(len(chosen), len(rejected)):
        raise RejectRow("one of chosen and rejected is a prefix of the other: no completion to tell apart")
    if idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _from_conversational(rec: dict, cols: ColumnNames) -> Pair:
    chosen, rejected = _messages(rec, cols.chosen), _messages(rec, cols.rejected)
    prompt_field = rec.get(cols.prompt)
    if isinstance(prompt_field, list):
        prompt = _messages(rec, cols.prompt)
    else:
        turns = 0
        while turns < min(len(chosen), len(rejected)) and chosen[turns] == rejected[turns]:
            turns += 1
        prompt, chosen, rejected = chosen[:turns], chosen[turns:], rejected[turns:]
        if not prompt:
            if cols.prompt not in rec or any(m["role"] != "assistant" for m in chosen + rejected):
                raise RejectRow("prompts of chosen and rejected differ (no leading turn in common)")
            # UltraFeedback-style rows holding only the assistant turn: the prompt column is the user turn
            prompt = [{"role": "user", "content": _string(rec, cols.prompt, "prompt")}]
    for name, completion in ((cols.chosen, chosen), (cols.rejected, rejected)):
        if not completion:
            raise RejectRow(f"{name} has no completion after the prompt")
        if completion[-1]["role"] != "assistant":
            raise RejectRow(f"{name} does not end with an assistant turn")
    _check_prompt(prompt)
    _check_responses(_text_of(chosen), _text_of(rejected), same=chosen == rejected)
    return Pair("", prompt, chosen, rejected, *_scores(rec, cols))


def _text_of(completion: Messages) -> str:
    return "".join(m["content"] for m in completion if m["role"] == "assistant")


def _from_transcript(rec: dict, cols: ColumnNames) -> Pair:
    chosen_prompt, chosen = split_transcript(_string(rec, cols.chosen))
    rejected_prompt, rejected = split_transcript(_string(rec, cols.rejected))
    if chosen_prompt != rejected_prompt:
        raise RejectRow("prompts of chosen and rejected differ")
    _check_responses(chosen, rejected)
    return Pair("", chosen_prompt, assistant(chosen), assistant(rejected), *_scores(rec, cols))


def split_transcript(text: str) -> tuple[Messages, str]:
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
    if isinstance(rec.get(cols.prompt), list):
        prompt = message_prompt(rec, cols.prompt)
    else:
        prompt = [{"role": "user", "content": _string(rec, cols.prompt, "prompt")}]
    responses = rec.get(cols.responses)
    if not isinstance(responses, list):
        raise RejectRow(_type_reason(cols.responses, responses, "a list of strings"))
    if not all(isinstance(r, str) for r in responses):
        raise RejectRow(f"{cols.responses} holds a non-string response")
    scores = rec.get(cols.scores)
    if scores is None:
        if len(_distinct(responses)) < 2:
            raise RejectRow("fewer than 2 distinct candidates")
        return Pair("", prompt, None, None, candidates=responses)
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise RejectRow(f"{cols.scores} must be a list as long as {cols.responses}")
    values = [_finite(s, f"{cols.scores}[{i}]") for i, s in enumerate(scores)]
    best, worst = pick_pair(responses, values)
    return Pair("", prompt, assistant(responses[best]), assistant(responses[worst]), values[best], values[worst],
                candidates=responses, candidate_scores=values)


def pick_pair(responses: list[str], scores: list[float | None]) -> tuple[int, int]:
    """Indices of (chosen, rejected) among scored candidates.

    Deterministic ties: empty and duplicate responses are ignored (first occurrence kept); chosen is the first
    candidate with the highest score, rejected the last one with the lowest score among the others.
    """
    keep = _distinct(responses)
    if len(keep) < 2:
        raise RejectRow("fewer than 2 distinct candidates")
    best = max(keep, key=lambda i: (scores[i], -i))
    rest = [i for i in keep if i != best]
    worst = min(rest, key=lambda i: (scores[i], -i))
    return best, worst


def distinct_candidates(responses: list[str]) -> list[int]:
    """Indices of the candidates that take part in picking a pair: non-empty, first of each duplicate text."""
    return _distinct(responses)


def _distinct(responses: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, response in enumerate(responses):
        text = response.strip()
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


def _messages(rec: dict, name: str) -> Messages:
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


def message_prompt(rec: dict, name: str) -> Messages:
    """A prompt field holding messages: well-formed turns, not ending with an assistant turn, not empty."""
    prompt = _messages(rec, name)
    _check_prompt(prompt)
    return prompt


def _check_prompt(messages: Messages) -> None:
    if messages[-1]["role"] == "assistant":
        raise RejectRow("prompt ends with an assistant turn")
    if not any(m["content"].strip() for m in messages):
        raise RejectRow("empty prompt")


def _check_responses(chosen: str, rejected: str, same: bool | None = None) -> None:
    if not chosen.strip():
        raise RejectRow("empty chosen response")
    if not rejected.strip():
        raise RejectRow("empty rejected response")
    identical = chosen == rejected if same is None else same  # conversational: the whole completions compared
    if identical:
        raise RejectRow("chosen and rejected responses are identical")


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
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        raise RejectRow(f"{name} is infinite") from None
    if math.isnan(value):
        raise RejectRow(f"{name} is NaN")
    if math.isinf(value):
        raise RejectRow(f"{name} is infinite")
    return value


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
    encoded = json.dumps(content, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    return hashlib.sha256(encoded).hexdigest()[:24]
