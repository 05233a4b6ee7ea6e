"""Copies of one pair_id among a pool's good rows: found by a hash of pair_id (the selection's first pass reports
the hashes more than one row carries), told apart by the row key, and set aside with their reason (stage
"dedupe"). When every copy holds the same input row (the pair and the input's own columns), one copy stays in
the pool and the others are set aside; when the copies differ, the id is ambiguous and all of them are set aside.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mapray import columns as C
from mapray.normalize import raw_json
from mapray.public_rows import good
from mapray.reductions import reduce

DEDUPE = "dedupe"
COMPUTED = {*C.SCORED, C.CANDIDATE_REWARDS_OUT, *C.REJECT_COLUMNS} - {C.PAIR_ID}  # not part of a row's content
# the internal columns that are a row's content (its canonical pair); the others are bookkeeping
CONTENT = {C.PROMPT, C.CHOSEN, C.REJECTED, C.CANDIDATES, C.SCORE_CHOSEN, C.SCORE_REJECTED}


def hashes(ids: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each pair_id (polars', seeded): equal ids hash alike in every process of a run."""
    import polars as pl

    return pl.Series(ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())).hash(seed=7).to_numpy()


def duplicate_rejects(rows, key: str, repeated: np.ndarray) -> dict[str, str]:
    """{row key: reason} for the copies of pair_ids that more than one good row carries (module docstring):
    `repeated`, the first pass's hashes of such ids (a hash collision only brings a row here to be let go)."""
    copies: dict[str, list[dict]] = {}
    found = reduce(rows, _with_hashes, repeated=repeated)
    for row in found.to_pylist() if found is not None else []:
        copies.setdefault(row[C.PAIR_ID], []).append(row)
    reasons = {}
    for group in copies.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: r[key])
        content = content_columns(group[0], key)
        if all([r[c] for c in content] == [group[0][c] for c in content] for r in group):
            reasons.update({r[key]: "duplicate pair_id: an identical copy of a scored row" for r in group[1:]})
        else:
            reasons.update({r[key]: f"duplicate pair_id: {len(group)} rows with different content share it"
                            for r in group})
    return reasons


def content_columns(names, key: str | None) -> list[str]:
    """The columns that make a row what it is: the pair and the input's own columns (public or internal rows),
    not what mapray computed or keeps for its own bookkeeping."""
    return [c for c in names if c not in COMPUTED and not C.is_reward_extra(c) and c != key
            and (not c.startswith(C.INTERNAL_PREFIX) or c in CONTENT)]


def _with_hashes(table: pa.Table, repeated: np.ndarray) -> pa.Table:
    rows = good(table)
    return rows.filter(pa.array(np.isin(hashes(rows.column(C.PAIR_ID)), repeated)))


def set_aside(table: pa.Table, reasons: dict[str, str], key: str) -> pa.Table:
    """The copies of duplicated pair_ids in a block set aside (stage "dedupe"), public or internal rows. A public
    row keeps the row it was given as its raw (an internal row gets the input row's when it becomes public)."""
    keys = table.column(key).to_pylist()
    internal = C.REJECT in table.column_names
    reason_col, stage_col = (C.REJECT, C.REJECT_STAGE) if internal else (C.REJECT_REASON, C.REJECT_PREFIX + C.STAGE)
    reason, stage = table.column(reason_col).to_pylist(), table.column(stage_col).to_pylist()
    hit = [i for i, k in enumerate(keys) if k in reasons and reason[i] is None]
    if not hit:
        return table
    for i in hit:
        reason[i], stage[i] = reasons[keys[i]], DEDUPE
    table = C.set_column(C.set_column(table, reason_col, reason, pa.string()), stage_col, stage, pa.string())
    if internal:
        return table
    raw_col = C.REJECT_PREFIX + C.RAW_OUT
    raw = table.column(raw_col).to_pylist()
    content = table.select(content_columns(table.column_names, key))
    for i in hit:
        raw[i] = raw_json(content.slice(i, 1).to_pylist()[0])
    return C.set_column(table, raw_col, raw, pa.string())
