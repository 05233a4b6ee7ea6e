"""The output URI's layout, its staged steps, and publishing a finished run.

<output>/scored/      one row per scored pair (`mapray.public_rows`): TRL's columns, the input's own, mapray's
<output>/selected/    the selected rows only
<output>/rejects/     pair_id, reason, stage, source (file:line), raw (the input row as JSON)
<output>/README.md       a dataset card (mapray/card.py): `datasets.load_dataset(<output>)` reads the folders
<output>/manifest.json   written last: config, models, versions, counts, selection, pool moments, timings
<output>/diff.json, diff/   with `diff:` in the config: what changed since the previous run (`mapray.changes`)
A run writes into <output>/_staging/<run_id>/ and moves its folders into place only once all of them are
complete; manifest.json goes last, so a reader that waits for it never sees a half-written result.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from mapray import card, reasons
from mapray import columns as C
from mapray.errors import ConfigError
from mapray.public_rows import reject_rows, scored_rows
from mapray.uris import absolute, filesystem, move_folder, reachable

FOLDERS = ("scored", "selected", "rejects")
DIFF = "diff"  # <output>/diff.json and diff/: what changed since the previous run (`mapray.changes`)


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

    def stage(self, name: str, write: Callable[[str], object], resumable: bool = False) -> str:
        """Staged step `name`: `write(path)` into its staged folder unless an earlier attempt of this run finished
        it (a `.done` marker, written once the step is whole). What a cut-short attempt left is removed first,
        unless the step is `resumable` (its write picks up from its own checkpoint). Returns the folder."""
        path = self.staged(name)
        if not self.is_done(name):
            if not resumable:
                self.remove(path)
            write(path)
            self.mark_done(name)
        return path

    def has_parquet(self, path: str) -> bool:
        local = fsspec.core.url_to_fs(path)[1]
        return self.fs.exists(local) and any(p.endswith(".parquet") for p in self.fs.find(local))

    def publish(self, manifest: dict, diff: dict | None = None) -> None:
        """Swaps the staged folders in and writes the dataset card. manifest.json goes first and comes back last,
        so a reader that follows the protocol in `read_manifest` never takes a mix of two runs for a complete
        result. `diff`: this run's diff against the previous one (`mapray.changes`: diff.json, and diff/ staged);
        without one, an earlier run's diff is removed (it describes another selection)."""
        self._swap_in((*FOLDERS, DIFF), ["manifest.json", f"{DIFF}.json"])
        if diff is None:
            self.remove(self.final(DIFF))
        else:
            write_json(f"{self.uri}/{DIFF}.json", diff)
        with self.fs.open(f"{self.root}/README.md", "w") as f:
            f.write(card.render(manifest))
        write_manifest(self.uri, manifest)
        self.fs.rm(f"{self.root}/_staging/{self.run_id}", recursive=True)

    def publish_folder(self, name: str, info: dict) -> None:
        """Moves staged folder `name` to <output>/<name>/ and writes <output>/<name>.json last (what readers wait
        for). The output's manifest goes first: what the output's other folders hold no longer matches <name>/
        until a run writes them again."""
        self._swap_in([name], ["manifest.json", f"{name}.json"])
        write_json(f"{self.uri}/{name}.json", info)
        self.fs.rm(f"{self.root}/_staging/{self.run_id}", recursive=True)

    def _swap_in(self, names, markers: list[str]) -> None:
        """Removes the markers (from here on the output reads as being published), then moves each staged folder
        over its final one. A folder an attempt cut short has moved already is complete: it stays."""
        for marker in markers:
            if self.fs.exists(f"{self.root}/{marker}"):
                self.fs.rm(f"{self.root}/{marker}")
        for name in names:
            staged, final = (fsspec.core.url_to_fs(p)[1] for p in (self.staged(name), self.final(name)))
            if not self.fs.exists(staged):
                continue
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            move_folder(self.fs, staged, final)


def write_manifest(uri: str, manifest: dict) -> None:
    write_json(f"{uri.rstrip('/')}/manifest.json", manifest)


def write_json(uri: str, data: dict) -> None:
    """A JSON file written beside its place and moved there: a reader never sees half of it."""
    fs, path = fsspec.core.url_to_fs(uri)
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    fs.mv(tmp, path)


def read_json(uri: str) -> dict | None:
    """A JSON file's contents; None when there is no such file."""
    try:
        with fsspec.open(uri) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_manifest(uri: str) -> dict:
    """The published result's manifest. For trainers: read it first, read the folders, then check that
    manifest.json still holds the same run_id; a missing manifest means no result or one being published."""
    manifest = read_json(f"{uri.rstrip('/')}/manifest.json")
    if manifest is None:
        raise ConfigError(f"no manifest.json under {uri}: not a finished mapray output "
                          "(or a run is publishing it right now)")
    return manifest


def write_results(rows, marked: Callable[[pa.Table], pa.Table], selection, layout: OutputLayout,
                  rejects: bool = True) -> dict:
    """The global pass's writes into the staging folder, in one pass over `rows`: each block made public rows with
    the decision applied (`marked`) -> scored/ (the pool's rows), selected/ (the kept ones) and, with `rejects`,
    rejects/ (every row set aside, the copies of duplicated pair_ids included). Returns the counts the manifest
    records."""
    folders = FOLDERS if rejects else FOLDERS[:2]
    for name in folders:  # a global pass cut short earlier left partial folders
        layout.remove(layout.staged(name))
        layout.ensure(layout.staged(name))
    sink = ResultsSink({name: layout.staged(name) for name in folders})
    rows.map_batches(marked, batch_format="pyarrow").write_datasink(sink)
    written = sink.written
    by_code = reasons.by_code(written["rejected_by_reason"])
    n_rejected = sum(entry["count"] for entry in by_code.values())
    counts = {"input": selection.scored + n_rejected, "scored": selection.scored, "rejected": n_rejected,
              "selected": selection.count, "rejected_by_code": by_code}
    if (written["scored"], written["selected"]) != (selection.scored, selection.count):
        raise RuntimeError(f"the global pass wrote {written['scored']} scored and {written['selected']} selected "
                           f"rows where the selection decided {selection.scored} and {selection.count}")
    # built by the same steps as the real rows
    empty_scored = written["schema"] or scored_rows(marked(rows.schema().base_schema.empty_table())).schema
    if rejects and not n_rejected:
        layout.write_empty("rejects", C.REJECTS_SCHEMA)
    if not counts["scored"]:
        layout.write_empty("scored", empty_scored)
    if not counts["selected"]:  # selected/ takes the exact schema scored/ was written with
        layout.write_empty("selected", empty_scored)
    return counts


class ResultsSink(Datasink):
    """Ray Data datasink (`Dataset.write_datasink`) for blocks of marked public rows: each write task splits its
    blocks into scored/, selected/ and rejects/ rows and writes one Parquet file per folder (named by the task, so
    a retried task overwrites its own files), returning its counts; `written` holds their sum once the write ends.
    An empty folder gets no file here (`write_results` gives it a 0-row file with its columns: Ray writes no file
    for no rows, and a reader needs one)."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders
        self.prefix = uuid.uuid4().hex[:12]
        self.written: dict = {}

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        public = pa.concat_tables(tables, promote_options="default") if tables else None
        out = {"scored": 0, "selected": 0, "rejected_by_reason": Counter(), "schema": None}
        if public is None or public.num_rows == 0:
            return out
        scored = scored_rows(public)
        parts = {"scored": scored, "selected": scored.filter(scored.column(C.SELECTED))}
        if "rejects" in self.folders:
            parts["rejects"] = reject_rows(public)
            out["rejected_by_reason"] = Counter(parts["rejects"].column("reason").to_pylist())
        for name, table in parts.items():
            if table.num_rows:
                fs, folder = fsspec.core.url_to_fs(self.folders[name])
                with fs.open(f"{folder}/{self.prefix}_{ctx.task_idx:06d}.parquet", "wb") as f:
                    pq.write_table(table, f)
        out.update(scored=scored.num_rows, selected=parts["selected"].num_rows, schema=scored.schema)
        return out

    def on_write_complete(self, result) -> None:
        total = {"scored": 0, "selected": 0, "rejected_by_reason": Counter(), "schema": None}
        for part in result.write_returns:
            total["scored"] += part["scored"]
            total["selected"] += part["selected"]
            total["rejected_by_reason"] += part["rejected_by_reason"]
            total["schema"] = total["schema"] or part["schema"]
        self.written = total
