"""Finding and reading the input files: any fsspec/pyarrow URI, Parquet or JSONL(.gz), files or folders.

JSONL is read line by line as raw bytes (a small Ray datasource) rather than with Arrow's JSON reader, so that
one bad line (invalid UTF-8, invalid JSON, a field of the wrong type) becomes one rejected row instead of a
failed read. Parquet goes through Ray's own reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from mapray import columns as C
from mapray.config import InputConfig
from mapray.errors import ConfigError
from mapray.uris import is_local, reachable

PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
_ARROW_NATIVE = {"s3", "s3a", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}
LINES_PER_BLOCK = 4096


@dataclass(frozen=True)
class InputFiles:
    paths: list[str]  # without protocol where the filesystem object carries it
    file_format: str  # parquet | jsonl
    filesystem: object | None  # pyarrow filesystem for Ray, None: let Ray resolve
    uris: list[str]  # as the user can open them with fsspec

    def listing(self) -> list[list]:
        """Each file's URI, size and modification time: what tells a rerun that the input changed."""
        out = []
        for uri in self.uris:
            fs, path = fsspec.core.url_to_fs(uri)
            info = fs.info(path)
            out.append([uri, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")])
        return out


def discover(cfg: InputConfig) -> InputFiles:
    """Expands files, folders and globs; fails with one line when nothing readable is there."""
    uris = cfg.uri if isinstance(cfg.uri, list) else [cfg.uri]
    found: list[str] = []
    for uri in uris:
        fs, path = reachable(uri, "input.uri")  # a missing package or bucket, an unreachable endpoint
        try:
            if fs.isdir(path):
                files = sorted(p for p in fs.find(path) if p.endswith(PARQUET + JSONL))
            else:
                files = sorted(fs.glob(path)) if any(ch in path for ch in "*?[") else (
                    [path] if fs.exists(path) else [])
        except Exception as e:  # no permission to list, a broken mount
            raise ConfigError(f"input.uri: cannot read {uri}: {e}") from None
        if not files:
            raise ConfigError(f"input.uri: no input files at {uri}")
        found += [fs.unstrip_protocol(p) for p in files]
    return _input_files(found, _file_format(cfg, found))


def _file_format(cfg: InputConfig, uris: list[str]) -> str:
    if cfg.file_format != "auto":
        return cfg.file_format
    kinds = {"parquet" if u.endswith(PARQUET) else "jsonl" if u.endswith(JSONL) else "?" for u in uris}
    if kinds == {"parquet"} or kinds == {"jsonl"}:
        return kinds.pop()
    raise ConfigError(f"input.file_format: cannot tell from the file names ({uris[0]}, ...); set it")


def _input_files(uris: list[str], file_format: str) -> InputFiles:
    if is_local(uris[0]):
        return InputFiles([fsspec.core.strip_protocol(u) for u in uris], file_format, None, uris)
    if fsspec.core.split_protocol(uris[0])[0] in _ARROW_NATIVE:
        return InputFiles(uris, file_format, None, uris)
    # any other fsspec protocol: hand Ray a pyarrow wrapper around the fsspec filesystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(uris[0])
    return InputFiles([fsspec.core.url_to_fs(u)[1] for u in uris], file_format,
                      PyFileSystem(FSSpecHandler(fs)), uris)


def sample_records(files: InputFiles, n: int) -> list[dict]:
    """The first `n` rows of the first file that are JSON objects (JSONL) or that Python can read (Parquet):
    for format detection and the JSONL column types. A file that cannot be read at all stops the run here."""
    uri = files.uris[0]
    try:
        if files.file_format == "parquet":
            return _parquet_sample(uri, n)
        rows = []
        with fsspec.open(uri, "rb", compression="infer") as f:
            for line in f:
                if len(rows) >= n:
                    break
                rec, reason = parse_line(line.rstrip(b"\r\n"))
                if reason is None:
                    rows.append(rec)
        return rows
    except (OSError, EOFError, pa.ArrowException) as e:  # not Parquet, a broken gzip stream, too deep a schema
        raise ConfigError(f"input.uri: cannot read {uri}: {e}") from None


def _parquet_sample(uri: str, n: int) -> list[dict]:
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=n), None)
        if batch is None:
            return []
        rows, reasons = table_rows(pa.Table.from_batches([batch]))
        return [row for row, reason in zip(rows, reasons) if reason is None]


def parse_line(raw: bytes) -> tuple[object, str | None]:
    """One JSONL line -> (the object, None), or (what it holds, the reason it is not a row). The same rules
    for the driver's sample and for the normalize step."""
    try:
        rec = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte-order mark on a file's first line is no error
    except UnicodeDecodeError:
        return raw, "invalid UTF-8"
    except RecursionError:
        return raw, "invalid JSON (nested too deeply to parse)"
    except ValueError as e:
        return raw, f"invalid JSON ({str(e).split(':')[0]})"
    if not isinstance(rec, dict):
        return rec, f"row is a JSON {'null' if rec is None else type(rec).__name__}, not an object"
    return rec, None


def parse_lines(lines: list[bytes]) -> tuple[list, list]:
    """`parse_line` over a batch of lines: the records, and each one's reason (None for a row)."""
    parsed = [parse_line(raw) for raw in lines]
    return [rec for rec, _ in parsed], [reason for _, reason in parsed]


def table_rows(table: pa.Table) -> tuple[list[dict], list[str | None]]:
    """Arrow rows as dicts, with a reason for each row holding a value Python cannot read (invalid UTF-8 in a
    string column, a date beyond Python's range); that value reads None."""
    try:
        return table.to_pylist(), [None] * table.num_rows
    except Exception:  # whatever the conversion fails on: find its rows, one value at a time
        pass
    rows, reasons = [], []
    for i in range(table.num_rows):
        row, reason = {}, None
        for name, column in zip(table.column_names, table.columns):
            try:
                row[name] = column[i].as_py()
            except Exception as e:
                row[name] = None
                reason = reason or f"field '{name}' cannot be read in Python ({type(e).__name__})"
        rows.append(row)
        reasons.append(reason)
    return rows, reasons


def read_dataset(files: InputFiles, limit: int | None, num_cpus: float = 1.0):
    import ray.data

    if files.file_format == "parquet":
        ds = ray.data.read_parquet(files.paths, filesystem=files.filesystem, num_cpus=num_cpus)
    else:
        ds = ray.data.read_datasource(JsonlLinesDatasource(files.paths, filesystem=files.filesystem),
                                      num_cpus=num_cpus)
    return ds.limit(limit) if limit is not None else ds


class JsonlLinesDatasource(FileBasedDatasource):
    """Yields JSONL files as blocks of raw lines (bytes) with their `path:line` source. Ray opens the stream
    (gzip inferred from the extension); lines are split here, a megabyte at a time."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        lines: list[bytes] = []
        sources: list[str] = []
        for number, line in enumerate(_iter_lines(f), start=1):
            if not line.strip():
                continue
            lines.append(line)
            sources.append(f"{path}:{number}")
            if len(lines) >= LINES_PER_BLOCK:
                yield _lines_table(lines, sources)
                lines, sources = [], []
        if lines:
            yield _lines_table(lines, sources)


def _iter_lines(f, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    rest = b""
    while chunk := f.read(chunk_size):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part.rstrip(b"\r")
    if rest:
        yield rest.rstrip(b"\r")


class ParquetStagingDatasource(FileBasedDatasource):
    """mapray's own staged Parquet, read as a plain `Read` (Ray's `read_parquet` lists files in a task that
    asks a whole CPU, which model actors on a small machine never leave free)."""

    _FILE_EXTENSIONS = ["parquet"]

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet needs random access

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(f).iter_batches(batch_size=LINES_PER_BLOCK):
            yield pa.Table.from_batches([batch])


def read_staged(uri: str, num_cpus: float):
    import ray.data

    fs, path = fsspec.core.url_to_fs(uri)
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    return ray.data.read_datasource(ParquetStagingDatasource(
        files if is_local(uri) else [fs.unstrip_protocol(p) for p in files]),
        num_cpus=num_cpus)


LINE = "_m_line"


def _lines_table(lines: list[bytes], sources: list[str]) -> pa.Table:
    return pa.table({LINE: pa.array(lines, pa.binary()), C.SOURCE: pa.array(sources, pa.string())})
