"""The output URI's layout, the row shapes written there, and publishing a finished run.

<output>/scored/      one row per scored pair: the input's own columns + `mapray.columns.SCORED`
<output>/selected/    the selected rows only
<output>/rejects/     pair_id, reason, stage, source (file:line), raw (the input row as JSON)
<output>/README.md       a dataset card (mapray/card.py): `datasets.load_dataset(<output>)` reads the folders
<output>/manifest.json   written last: config, models, versions, counts, selection, pool moments, timings
A run writes into <output>/_staging/<run_id>/ and moves its folders into place only once all of them are
complete; manifest.json goes last, so a reader that waits for it never sees a half-written result.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mapray import card
from mapray import columns as C
from mapray.config import ColumnNames, ConfigError
from mapray.normalize import raw_json
from mapray.uris import absolute, filesystem, move_folder, reachable

FOLDERS = ("scored", "selected", "rejects")


class OutputLayout:
    def __init__(self, uri: str, run_id: str | None = None):
        self.uri = absolute(uri).rstrip("/")  # handed to Ray's writers and checkpoint
        self.fs, self.root = filesystem(self.uri, "output")
        self.run_id = run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    def final(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def staged(self, name: str) -> str:
        return f"{self.uri}/_staging/{self.run_id}/{name}"

    def check_writable(self) -> None:
        """Fails before any model loads when the output URI cannot be written."""
        probe = f"{self.root}/_staging/.write-probe-{self.run_id}"
        reachable(self.uri, "output")  # before makedirs, which would create a missing bucket
        try:
            self.fs.makedirs(f"{self.root}/_staging", exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except Exception as e:
            raise ConfigError(f"output: cannot write to {self.uri}: {e}") from None

    def exists(self, path: str) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(path)[1])

    def is_done(self, name: str) -> bool:
        return self.exists(self.staged(f"{name}.done"))

    def mark_done(self, name: str) -> None:
        with self.fs.open(fsspec.core.url_to_fs(self.staged(f"{name}.done"))[1], "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def remove(self, path: str) -> None:
        local = fsspec.core.url_to_fs(path)[1]
        if self.fs.exists(local):
            self.fs.rm(local, recursive=True)

    def ensure(self, path: str) -> None:
        self.fs.makedirs(fsspec.core.url_to_fs(path)[1], exist_ok=True)

    def write_empty(self, name: str, schema: pa.Schema) -> None:
        """One 0-row Parquet file in staged folder `name`, so an empty result still reads with its columns."""
        path = f"{fsspec.core.url_to_fs(self.staged(name))[1]}/empty.parquet"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        # no row group at all: `datasets` fails on a file whose one row group holds 0 rows (pq.write_table's)
        with self.fs.open(path, "wb") as f, pq.ParquetWriter(f, schema):
            pass

    def has_parquet(self, path: str) -> bool:
        local = fsspec.core.url_to_fs(path)[1]
        return self.fs.exists(local) and any(p.endswith(".parquet") for p in self.fs.find(local))

    def publish(self, manifest: dict) -> None:
        """Swaps the staged folders in and writes the dataset card. manifest.json goes first and comes back last,
        so a reader that follows the protocol in `read_manifest` never takes a mix of two runs for a complete
        result."""
        manifest_path = f"{self.root}/manifest.json"
        if self.fs.exists(manifest_path):
            self.fs.rm(manifest_path)  # from here on the output reads as "being published"
        for name in FOLDERS:
            staged, final = (fsspec.core.url_to_fs(p)[1] for p in (self.staged(name), self.final(name)))
            if not self.fs.exists(staged):
                continue
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            move_folder(self.fs, staged, final)
        with self.fs.open(f"{self.root}/README.md", "w") as f:
            f.write(card.render(manifest))
        write_manifest(self.uri, manifest)
        self.fs.rm(f"{self.root}/_staging/{self.run_id}", recursive=True)


def write_manifest(uri: str, manifest: dict) -> None:
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
    tmp = f"{root}/.manifest.json.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    fs.mv(tmp, f"{root}/manifest.json")


def read_manifest(uri: str) -> dict:
    """The published result's manifest. For trainers: read it first, read the folders, then check that
    manifest.json still holds the same run_id; a missing manifest means no result or one being published."""
    try:
        with fsspec.open(f"{uri.rstrip('/')}/manifest.json") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no manifest.json under {uri}: not a finished mapray output "
                          "(or a run is publishing it right now)") from None


@dataclass(frozen=True)
class TrlColumns:
    """How a run writes TRL's `prompt`, `chosen`, `rejected` (the pair it scored, explicit prompt) into scored/.

    An input column of one of those names whose values are not already that (an implicit prompt inside chosen, an
    HH transcript, UltraFeedback's full conversations, a candidates row's prompt string; a candidates row's
    message-list prompt is TRL's already) is kept, renamed
    `original_<name>`; where the input already is TRL's explicit-prompt form, its columns are the ones written."""

    conversational: bool
    candidates: bool = False
    originals: tuple[str, ...] = ()

    @classmethod
    def of(cls, fmt: str, cols: ColumnNames, sample: dict) -> TrlColumns:
        explicit = (fmt == "standard" and isinstance(sample.get(cols.prompt), str)) or (
            fmt in ("conversational", "candidates") and isinstance(sample.get(cols.prompt), list))
        own_names = (cols.prompt, cols.chosen, cols.rejected)
        kept_as_is = explicit and own_names == C.TRL_COLUMNS
        originals = () if kept_as_is else tuple(n for n in C.TRL_COLUMNS if n in sample)
        return cls(fmt != "standard", fmt == "candidates", originals)


def scored_rows(table: pa.Table, trl: TrlColumns | None = None) -> pa.Table:
    """TRL's columns first (built from the canonical pair; `trl` None: the table already has them, as in a
    reselection), then the input's own columns, then the public ones in their documented order."""
    own = [c for c in table.column_names if c not in C.SCORED and not c.startswith("_m_")]
    if trl is None:
        return table.select(own + [c for c in C.SCORED if c in table.column_names])
    columns = {name: _trl_array(table.column(internal), trl.conversational)
               for name, internal in zip(C.TRL_COLUMNS, (C.PROMPT, C.CHOSEN, C.REJECTED))}
    if trl.candidates:
        columns[C.CANDIDATE_REWARDS_OUT] = table.column(C.CANDIDATE_REWARDS)
    for name in own:
        if name in C.TRL_COLUMNS and name not in trl.originals:
            continue  # the same values, written once as TRL's column
        columns[C.ORIGINAL_PREFIX + name if name in trl.originals else name] = table.column(name)
    columns.update({c: table.column(c) for c in C.SCORED if c in table.column_names})
    return pa.table(columns)


def _trl_array(column: pa.ChunkedArray, conversational: bool) -> pa.Array:
    values = [None if v is None else json.loads(v) for v in column.to_pylist()]
    return pa.array(values, C.MESSAGES if conversational else pa.string())


def reject_rows(table: pa.Table) -> pa.Table:
    """rejects/ rows; for rows rejected after normalize, `raw` is rebuilt from the input's own columns."""
    raw = table.column(C.RAW).to_pylist()
    own = table.select([c for c in table.column_names if c not in C.SCORED and not c.startswith("_m_")])
    for i, value in enumerate(raw):
        if value is None:
            raw[i] = raw_json(own.slice(i, 1).to_pylist()[0])
    return pa.table({
        C.PAIR_ID: table.column(C.PAIR_ID).cast(pa.string()),
        "reason": table.column(C.REJECT),
        "stage": table.column(C.REJECT_STAGE),
        "source": table.column(C.SOURCE),
        "raw": pa.array(raw, pa.string()),
    }, schema=C.REJECTS_SCHEMA)
