"""Column names shared by the stages, the metrics pass and the writers.

Public names (written to `scored/`, relied on by downstream tools; TRL's DPOTrainer reads ref_*_logps) and
internal `_m_*` names, which carry the canonical pair between stages and are dropped before writing.
"""

from __future__ import annotations

import re

import pyarrow as pa

PAIR_ID = "pair_id"
INTERNAL_PREFIX = "_m_"  # mapray's own columns between steps; never handed out

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

# public, added to every scored row in this order (the names every module and the report read)
REWARD_CHOSEN, REWARD_REJECTED = "reward_chosen", "reward_rejected"
EXPLICIT_MARGIN = "explicit_margin"
CHOSEN_LOGPS, REJECTED_LOGPS = "chosen_logps", "rejected_logps"
CHOSEN_TOKENS, REJECTED_TOKENS = "chosen_tokens", "rejected_tokens"
CHOSEN_TRUNCATED, REJECTED_TRUNCATED = "chosen_truncated", "rejected_truncated"
REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS = "ref_chosen_logps", "ref_rejected_logps"
IMPLICIT_REWARD_CHOSEN, IMPLICIT_REWARD_REJECTED = "implicit_reward_chosen", "implicit_reward_rejected"
IMPLICIT_MARGIN = "implicit_margin"
# the MAP forms (formulas in `mapray.metrics.map_forms`), computed by the selection from the pool and alpha
MAP, MAP_UNREG, MAP_Z = "map", "map_unreg", "map_z"
MAP_FORMS = (MAP, MAP_UNREG, MAP_Z)
SELECTED = "selected"

SCORED = {
    PAIR_ID: pa.string(),
    REWARD_CHOSEN: pa.float64(),
    REWARD_REJECTED: pa.float64(),
    EXPLICIT_MARGIN: pa.float64(),
    CHOSEN_LOGPS: pa.float64(),
    REJECTED_LOGPS: pa.float64(),
    CHOSEN_TOKENS: pa.int64(),
    REJECTED_TOKENS: pa.int64(),
    CHOSEN_TRUNCATED: pa.bool_(),
    REJECTED_TRUNCATED: pa.bool_(),
    REF_CHOSEN_LOGPS: pa.float64(),
    REF_REJECTED_LOGPS: pa.float64(),
    IMPLICIT_REWARD_CHOSEN: pa.float64(),
    IMPLICIT_REWARD_REJECTED: pa.float64(),
    IMPLICIT_MARGIN: pa.float64(),
    MAP: pa.float64(),
    MAP_UNREG: pa.float64(),
    MAP_Z: pa.float64(),
    SELECTED: pa.bool_(),
}
SELECTION_COLUMNS = (*MAP_FORMS, SELECTED)  # what the selection adds; the rest of SCORED is the scorer's

# Several reward models (`reward.models`, `mapray.ensemble`): each model's rewards and margin under its name, the
# models' disagreement; a multi-label head's scores per label. Written after explicit_margin, only where present.
REWARD_MARGIN_SPREAD = "reward_margin_spread"  # population std over the models of their pool-z-scored margins
REWARD_SIGN_DISAGREE = "reward_sign_disagree"  # some model's margin is > 0 and another's < 0
LABELS_SUFFIX = "_labels"  # reward_chosen_labels, reward_<name>_rejected_labels: one score per label of the head
_REWARD_EXTRA = re.compile(r"reward_(?:[a-z][a-z0-9_]*_)?(?:chosen|rejected)_labels"
                           r"|reward_[a-z][a-z0-9_]*_(?:chosen|rejected|margin)|reward_margin_spread"
                           r"|reward_sign_disagree")


def reward_model_columns(name: str | None) -> tuple[str, str, str]:
    """(chosen, rejected, margin) column names of the reward model named `name` in a run of several; None: the
    one reward model's own (its margin is the explicit margin)."""
    if name is None:
        return REWARD_CHOSEN, REWARD_REJECTED, EXPLICIT_MARGIN
    return f"reward_{name}_chosen", f"reward_{name}_rejected", f"reward_{name}_margin"


def is_reward_extra(name: str) -> bool:
    """A column of several reward models or of a multi-label head (above): mapray's, not the input's."""
    return _REWARD_EXTRA.fullmatch(name) is not None


def is_mapray_column(name: str) -> bool:
    """A public column mapray computes: an input column of such a name is not the input's own."""
    return name in SCORED or is_reward_extra(name)


_EXTRA_SUFFIXES = ("_chosen", "_rejected", "_margin", "_chosen_labels", "_rejected_labels")


def _extra_rank(name: str, names: list[str]) -> tuple:
    """The models' columns model by model (in the order their first column comes), each as _EXTRA_SUFFIXES;
    the spread and the sign disagreement last."""
    if name in (REWARD_MARGIN_SPREAD, REWARD_SIGN_DISAGREE):
        return (len(names), name == REWARD_SIGN_DISAGREE)
    suffix = next(s for s in sorted(_EXTRA_SUFFIXES, key=len, reverse=True) if name.endswith(s))
    model = name[:-len(suffix)]
    first = min(i for i, n in enumerate(names) if n.startswith(model + "_") and is_reward_extra(n))
    return (first, _EXTRA_SUFFIXES.index(suffix))


def mapray_order(names: list[str]) -> list[str]:
    """mapray's columns among `names`, in their documented order: SCORED's, the reward models' after the
    explicit margin (in the order given)."""
    extra = sorted((n for n in names if is_reward_extra(n)), key=lambda n: _extra_rank(n, names))
    out = []
    for name in SCORED:
        if name in names:
            out.append(name)
        if name == EXPLICIT_MARGIN:
            out.extend(extra)
    return out

# rejects/: why a row was set aside, at which step, where it came from (file:line) and the input row as JSON
REASON, STAGE, SOURCE_OUT, RAW_OUT = "reason", "stage", "source", "raw"
REASON_CODE = "reason_code"  # the reason's stable code (`mapray.reasons`)
REJECTS_SCHEMA = pa.schema([
    (PAIR_ID, pa.string()), (REASON_CODE, pa.string()), (REASON, pa.string()), (STAGE, pa.string()),
    (SOURCE_OUT, pa.string()), (RAW_OUT, pa.string()),
])
# the same, as the Python API's scored rows carry them (null on a good row): `mapray.api.split_rejects` turns a
# scored Dataset's rejected rows into rejects/ rows
REJECT_PREFIX = "reject_"
REJECT_COLUMNS = {REJECT_PREFIX + name: pa.string() for name in (REASON, STAGE, SOURCE_OUT, RAW_OUT)}
REJECT_REASON = REJECT_PREFIX + REASON


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
