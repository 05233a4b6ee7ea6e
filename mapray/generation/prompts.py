"""Self-play prompts: any input mapray reads -> one prompt per row as chat messages, with its id and its seed.

A `prompt` column holding text becomes one user turn (an instruct policy samples through its chat template, as
the reference code does), a message list is taken as it is; rows without a prompt column (HH transcripts, TRL's
implicit-prompt pairs) give the prompt their pair would have (`mapray.formats`). A prompts-only file (a prompt
column and nothing a pair format needs) is format `prompts`.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import pyarrow as pa

from mapray import columns as C
from mapray.config import ColumnNames
from mapray.errors import ConfigError
from mapray.formats import Messages, RejectRow, detect_format, message_prompt, normalize_record
from mapray.inputs import LINE, parse_lines, table_rows
from mapray.normalize import EARLIER_KEY, raw_id, raw_json
from mapray.own_columns import unstorable

# columns of a prompts file that mapray's own evolve step writes, carried into generated/ and scored/
LINEAGE = {"evolved_from": pa.string(), "evolve_strategy": pa.string(), "evolve_round": pa.int64()}
# a key per prompt row, the sampling checkpoint's (a rerun samples only the rows it has not written)
ROW_ID = EARLIER_KEY
SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", C.MESSAGES), ("generation_error", pa.string()),
                    ("source", pa.string()), ("input_raw", pa.string()), *LINEAGE.items(), (ROW_ID, pa.string())])


def prompt_format(fmt: str, sample: list[dict], cols: ColumnNames) -> str:
    """The configured format, or the one the first row shows: `prompts` when it has a prompt and no responses."""
    if fmt != "auto":
        return fmt
    if not sample:
        raise ConfigError("input.format: no parseable row to detect the format from")
    first = sample[0]
    if cols.prompt in first and not {cols.chosen, cols.rejected, cols.responses} & set(first):
        return "prompts"
    try:
        return detect_format(first, cols)
    except RejectRow as e:
        raise ConfigError(f"input.format: {e}") from None


def prompt_messages(rec: dict, fmt: str, cols: ColumnNames) -> Messages:
    value = rec.get(cols.prompt)
    if isinstance(value, str):
        if not value.strip():
            raise RejectRow("empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return message_prompt(rec, cols.prompt)
    if fmt == "prompts" or value is not None:
        raise RejectRow(f"field '{cols.prompt}' must be a string or a list of messages, got "
                        f"{type(value).__name__ if cols.prompt in rec else 'nothing'}")
    prompt = normalize_record(rec, fmt, cols).prompt  # an implicit prompt: the one the row's pair has
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_id(rec: dict, messages: Messages, cols: ColumnNames) -> str:
    if cols.id is not None and isinstance(rec.get(cols.id), (str, int)) and not isinstance(rec[cols.id], bool):
        return str(rec[cols.id])
    encoded = json.dumps(messages, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    return hashlib.sha256(encoded).hexdigest()[:24]


def prompt_seed(seed: int, pid: str) -> int:
    """The seed of one prompt's samples: a function of the run's seed and the prompt alone."""
    digest = hashlib.blake2b(f"{seed}\x00{pid}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


class PromptReader:
    """Ray Data map_batches function: input rows (Parquet columns, or JSONL lines) -> `SCHEMA` rows, one per
    input row; a row without a usable prompt keeps its reason in `generation_error` and its raw content."""

    def __init__(self, fmt: str, cols: ColumnNames):
        self.fmt, self.cols = fmt, cols

    def __call__(self, table: pa.Table) -> pa.Table:
        if LINE in table.column_names:
            lines = table.column(LINE).to_pylist()
            records, reasons = parse_lines(lines)
            reasons = [r or (unstorable(rec, raw) if isinstance(rec, dict) else None)
                       for rec, r, raw in zip(records, reasons, lines)]
            sources = table.column(C.SOURCE).to_pylist()
        else:
            records, reasons = table_rows(table)
            sources = [None] * len(records)
        rows = [self._row(rec, reason, source) for rec, reason, source in zip(records, reasons, sources)]
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    def _row(self, rec, reason: str | None, source: str | None) -> dict:
        # every row keeps its input row as read: whatever sets it aside later names that, not a generated row
        row = {"source": source, "input_raw": raw_json(rec), ROW_ID: uuid.uuid4().hex}
        if reason is not None:
            return row | {"generation_error": f"prompt: {reason}"}
        own_id = raw_id(rec, self.cols.id)
        if own_id is not None:  # a row set aside below keeps the id the user gave it
            row["prompt_id"] = own_id
        row |= {k: v for k, v in rec.items() if k in LINEAGE and _fits(v, LINEAGE[k])}
        earlier = rec.get(self.cols.error) if self.cols.error else None
        if earlier is not None:  # set aside by the step that wrote this file (evolve), with its reason
            return row | {"generation_error": str(earlier)}
        try:
            messages = prompt_messages(rec, self.fmt, self.cols)
        except RejectRow as e:
            return row | {"generation_error": f"prompt: {e}"}
        except Exception as e:  # a reader's bug must cost its row, not the run (as in `mapray.normalize`)
            reason = f"internal error reading this row ({type(e).__name__}: {str(e)[:200]}); please report it"
            return row | {"generation_error": f"prompt: {reason}"}
        return row | {"prompt_id": prompt_id(rec, messages, self.cols), "prompt": messages}


def _fits(value, type_: pa.DataType) -> bool:
    """A lineage value of the column's type (only evolve writes them; anything else is not carried)."""
    if type_ == pa.string():
        return isinstance(value, str)
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
