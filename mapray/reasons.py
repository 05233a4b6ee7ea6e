"""Why a row was set aside, as a stable code beside the detail: rejects/ holds both (`reason_code`, `reason`), and
the manifest, the dataset card, the report and `mapray show` count rows per code, so one cause is one line however
many numbers its detail text carries ("the prompt alone fills max_length (1500 >= 1024 tokens...)" for each
length).

The codes are read off the reason's text by the table below, in order, first match wins: every place that sets a
row aside keeps writing a sentence for a person, and the code follows from it here, in one place. A text no
pattern knows is `other` (a test runs every bad-input case through this table and finds none there).
"""

from __future__ import annotations

import re

CODES: tuple[tuple[str, str], ...] = (
    ("invalid_json", r"^invalid (JSON|UTF-8)|^row is a JSON "),
    ("unreadable_value", r"cannot be read in Python|lone UTF-16 surrogate|UTF-8 cannot encode|integer outside the "
                         r"signed 64-bit range|nested deeper than"),
    ("missing_id", r"^missing id field"),
    ("missing_field", r"^missing field"),
    ("null_field", r"^null field"),
    ("unknown_field", r"is not among the input's columns"),
    ("wrong_type", r"^field '.*' (must be|does not match)|^field .* holds|holds a non-string|is not a \{role|"
                   r"content is not a string|has unknown role"),
    ("row_too_large", r"over input\.max_row_chars"),
    ("format_unknown", r"^cannot detect the input format"),
    ("empty_prompt", r"^empty prompt"),
    ("empty_response", r"^empty (chosen|rejected) response|has no completion after the prompt|"
                       r"a response has no tokens after the prompt"),
    ("identical_responses", r"responses are identical|is a prefix of the other"),
    ("prompts_differ", r"^prompts of chosen and rejected differ"),
    ("bad_transcript", r"transcript|turn|assistant turn"),
    ("non_finite_score", r"is NaN|is not finite|infinite"),
    ("too_few_candidates", r"fewer than 2 distinct candidates|must be a list as long as"),
    ("prompt_fills_max_length", r"prompt alone fills max_length"),
    ("template_rewrites_content", r"chat template rewrites message contents"),
    ("duplicate_pair_id", r"^duplicate pair_id"),
    ("no_room_to_sample", r"no room to sample"),
    ("chat_template_failed", r"chat template cannot render"),
    ("empty_samples", r"samples are empty"),
    ("rewrite_rejected", r"^evolve: "),
    ("reward_models_disagree", r"^reward models disagree in sign"),
    ("internal_error", r"internal error"),
)
OTHER = "other"
_COMPILED = tuple((code, re.compile(pattern)) for code, pattern in CODES)


def code_of(reason: str | None) -> str | None:
    """The stable code of a reason text (None for no reason: a good row)."""
    if reason is None:
        return None
    text = reason.removeprefix("prompt: ")  # self-play's prompt rows: the cause is what follows
    return next((code for code, pattern in _COMPILED if pattern.search(text)), OTHER)


def by_code(counts: dict[str, int]) -> dict[str, dict]:
    """{reason text: rows} -> {code: {"count": rows, "example": the commonest text}}, the commonest code first."""
    grouped: dict[str, dict] = {}
    for reason, n in sorted(counts.items(), key=lambda item: -item[1]):
        entry = grouped.setdefault(code_of(reason), {"count": 0, "example": reason})
        entry["count"] += n
    return dict(sorted(grouped.items(), key=lambda item: -item[1]["count"]))
