"""Column names shared by the stages, the metrics pass and the writers.

Public names (written to `scored/`, relied on by downstream tools; TRL's DPOTrainer reads ref_*_logps) and
internal `_m_*` names, which carry the canonical pair between stages and are dropped before writing.
"""

from __future__ import annotations

import pyarrow as pa

PAIR_ID = "pair_id"

# internal, dropped from scored/ (which carries them as TRL's prompt / chosen / rejected instead)
PROMPT = "_m_prompt"  # JSON: a string (standard) or a list of {role, content} (conversational)
CHOSEN = "_m_chosen"  # JSON: the completion, a string or a list of messages
REJECTED = "_m_rejected"
CANDIDATES = "_m_candidates"  # JSON list of strings: every response of an N-candidates row
CANDIDATE_REWARDS = "_m_candidate_rewards"  # one reward per candidate (null where a candidate takes no part)
SCORE_CHOSEN = "_m_score_chosen"
SCORE_REJECTED = "_m_score_rejected"
REJECT = "_m_reject"  # reason; null for a good row
REJECT_STAGE = "_m_reject_stage"
RAW = "_m_raw"  # the raw input row as JSON, kept only for rejected rows
SOURCE = "_m_source"  # file:line for JSONL input
ROW = "_m_row"  # a unique key per input row (tells copies of a duplicated pair_id apart)

INTERNAL = [PROMPT, CHOSEN, REJECTED, CANDIDATES, CANDIDATE_REWARDS, SCORE_CHOSEN, SCORE_REJECTED, REJECT,
            REJECT_STAGE, RAW, SOURCE, ROW]
INTERNAL_TYPES = {
    PROMPT: pa.string(), CHOSEN: pa.string(), REJECTED: pa.string(), CANDIDATES: pa.string(),
    CANDIDATE_REWARDS: pa.list_(pa.float64()),
    SCORE_CHOSEN: pa.float64(), SCORE_REJECTED: pa.float64(), REJECT: pa.string(), REJECT_STAGE: pa.string(),
    RAW: pa.string(), SOURCE: pa.string(), ROW: pa.string(),
}

# TRL's preference columns, first in every scored row: the pair mapray scored, in TRL's explicit-prompt form
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TRL_COLUMNS = ("prompt", "chosen", "rejected")
CANDIDATE_REWARDS_OUT = "candidate_rewards"  # N-candidates runs: aligned with the input's list of responses
ORIGINAL_PREFIX = "original_"  # an input column named like a TRL column, in another shape, is kept under this

# public, added to every scored row in this order
SCORED = {
    PAIR_ID: pa.string(),
    "reward_chosen": pa.float64(),
    "reward_rejected": pa.float64(),
    "explicit_margin": pa.float64(),
    "chosen_logps": pa.float64(),
    "rejected_logps": pa.float64(),
    "chosen_tokens": pa.int64(),
    "rejected_tokens": pa.int64(),
    "chosen_truncated": pa.bool_(),
    "rejected_truncated": pa.bool_(),
    "ref_chosen_logps": pa.float64(),
    "ref_rejected_logps": pa.float64(),
    "implicit_reward_chosen": pa.float64(),
    "implicit_reward_rejected": pa.float64(),
    "implicit_margin": pa.float64(),
    "map": pa.float64(),
    "map_unreg": pa.float64(),
    "map_z": pa.float64(),
    "selected": pa.bool_(),
}

REJECTS_SCHEMA = pa.schema([
    (PAIR_ID, pa.string()), ("reason", pa.string()), ("stage", pa.string()), ("source", pa.string()),
    ("raw", pa.string()),
])


def require(table: pa.Table, names: list[str], stage: str) -> None:
    """A stage's input check: names the first missing column instead of failing deep inside."""
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise KeyError(f"{stage}: input is missing column {missing[0]!r} (has {table.column_names})")


def set_column(table: pa.Table, name: str, values, type_: pa.DataType) -> pa.Table:
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


def mark_rejected(table: pa.Table, reasons: dict[int, str], stage: str) -> pa.Table:
    """Sets the reject reason and stage of the rows at the given indices (rows already rejected keep theirs)."""
    if not reasons:
        return table
    reject, where = table.column(REJECT).to_pylist(), table.column(REJECT_STAGE).to_pylist()
    for i, reason in reasons.items():
        if reject[i] is None:
            reject[i], where[i] = reason, stage
    table = set_column(table, REJECT, reject, pa.string())
    return set_column(table, REJECT_STAGE, where, pa.string())


def good_rows(table: pa.Table) -> list[int]:
    return [i for i, r in enumerate(table.column(REJECT).to_pylist()) if r is None]
