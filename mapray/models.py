"""Where a model's files are, and what it is.

A model path is a local checkpoint folder, an fsspec URI of one (copied once into the local cache), a `.gguf`
file (dequantized once into the local cache as a HF checkpoint, which both engines load), or
`pkg:PACKAGE/FILE` for a file shipped inside an installed Python package (the demo's SmolLM2). Nothing is
ever fetched from a model hub.

A model's identity is a SHA-256 over its config, tokenizer and weight bytes (the manifest and the score cache key
on it). Reading 16 GB per 8B checkpoint per run is too much, so the hash is computed once and remembered in a
small JSON memo under `cache_root()/identities/`, keyed by what a listing alone tells: the checkpoint's location
and each file's name, size and modification time (a local stat), or for a remote checkpoint its URI and each
object's size and version tag (ETag, md5Hash/generation, else a modification time). A rerun with unchanged
checkpoints reads no weight bytes and copies nothing; a rewritten file changes the key and is hashed again. The
same listing keys a remote checkpoint's local copy, so a checkpoint rewritten in place gets a fresh copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import fsspec

from mapray.errors import ConfigError
from mapray.uris import is_local, reachable

log = logging.getLogger(__name__)

_CONTENT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".gguf")
# what an object store's listing says about a version: content hashes first, else times (all present are kept)
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "generation", "VersionId", "mtime", "LastModified",
                   "last_modified", "updated", "modified", "created")
_MEMO_FORMAT = 1  # part of every memo key: a change to what is hashed must not reuse older memos
_GGUF_CONVERSION = 1  # part of a dequantized checkpoint's key: a change to `_dequantized` converts afresh
# a file modified this close to its hashing may be rewritten within the same mtime tick (coarse on some
# filesystems), unseen by its stat: such a hash is used but not remembered (git's "racy" entries)
_SETTLE_NS = 2_000_000_000


def cache_root() -> Path:
    return Path(os.environ.get("MAPRAY_CACHE", Path.home() / ".cache" / "mapray"))


def check_model_path(path: str, key: str) -> None:
    """Fails fast, before any model loads, when a configured model cannot be found."""
    if path.startswith("pkg:"):
        _package_file(path, key)
        return
    fs, local = reachable(path, key)
    try:
        exists = fs.exists(local)
    except Exception as e:  # credentials, unreachable host: one line, not a traceback
        raise ConfigError(f"{key}: cannot reach {path}: {e}") from None
    if not exists:
        raise ConfigError(f"{key}: model path does not exist: {path}")
    if not path.endswith(".gguf") and not fs.exists(f"{local.rstrip('/')}/config.json"):
        raise ConfigError(f"{key}: {path} is not a model checkpoint (no config.json)")


def _package_file(path: str, key: str) -> Path:
    package, _, name = path[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{key}: package {package!r} is not installed (needed for {path})")
    file = Path(next(iter(spec.submodule_search_locations))) / name
    if not file.exists():
        raise ConfigError(f"{key}: {name} is not in package {package}")
    return file


def resolve_model_path(path: str) -> str:
    """A local HF checkpoint folder for `path`, copying or converting into the cache on first use."""
    if path.startswith("pkg:"):
        path = str(_package_file(path, "model"))
    if not is_local(path):
        path = _copy_remote(path)
    return _checkpoint_dir(path)


def _checkpoint_dir(local: str) -> str:
    local = local.removeprefix("file://")
    return _dequantized(Path(local)) if local.endswith(".gguf") else local


def _copy_remote(uri: str, listing: list | None = None) -> str:
    """The local copy of `uri`, keyed by the URI and its listing (`listing` if already read)."""
    fs, remote = fsspec.core.url_to_fs(uri)
    if listing is None:
        listing = remote_listing(fs, remote)
    target = cache_root() / "remote" / _digest([uri, listing])[:16]
    if not target.exists():
        with _staging_dir(target) as tmp:
            if remote.endswith(".gguf"):
                fs.get(remote, str(tmp / Path(remote).name))
            else:
                fs.get(remote.rstrip("/") + "/", str(tmp), recursive=True)
    files = list(target.glob("*.gguf"))
    return str(files[0]) if uri.endswith(".gguf") else str(target)


def _dequantized(gguf: Path) -> str:
    """GGUF -> fp32 HF checkpoint (transformers reads GGUF but refuses to save a GGUF-loaded model), keyed by the
    file's content and what converts it (transformers' version, `_GGUF_CONVERSION`): the same file installed
    elsewhere (a new virtual environment, a copy) finds the checkpoint converted before instead of paying the
    conversion and its disk again; an upgraded transformers converts afresh."""
    from importlib.metadata import version

    converter = f"{_GGUF_CONVERSION}:{version('transformers')}"
    key = hashlib.sha256(f"{file_sha256(gguf)}:{converter}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, target)
    with _no_transformers_bars():  # its loading and saving bars: the line above says what happens
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with _staging_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return str(target)


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers' progress bars off for the block, as they were after it (mapray runs in its users' processes)."""
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _staging_dir(target: Path):
    """Writes into a temporary sibling folder and renames it into place, so concurrent actors never see a
    half-written checkpoint (the loser of a race discards its copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        yield tmp
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def identify_model(path: str) -> dict:
    """`{"path", "sha256"}` of a configured model path (local, `pkg:`, `.gguf` or remote): the local checkpoint the
    engines load and the SHA-256 of its files, remembered under its listing."""
    if path.startswith("pkg:") or is_local(path):
        return model_identity(resolve_model_path(path))
    fs, remote = fsspec.core.url_to_fs(path)
    listing = remote_listing(fs, remote)
    key = {"format": _MEMO_FORMAT, "uri": path, "files": listing}
    found = _recall(key)
    if found is None:  # first sight of these objects: copy them (the engines need the copy anyway) and hash it
        local = _checkpoint_dir(_copy_remote(path, listing))
        found = {"path": local, "sha256": content_sha256(local)}
        _remember(key, found)
    return {"path": found["path"], "sha256": found["sha256"]}


def model_identity(local_dir: str) -> dict:
    """Path plus the SHA-256 of `content_sha256`, remembered under the folder and its files' stat."""
    root = Path(local_dir)
    sha = _remembered_sha256(lambda: _local_key(root), lambda: content_sha256(local_dir), local_dir)
    return {"path": local_dir, "sha256": sha}


def file_sha256(file: Path) -> str:
    """The SHA-256 of one file's bytes, remembered under its path and stat as a checkpoint's is."""
    def key() -> dict:
        st = file.stat()
        return {"format": _MEMO_FORMAT, "file": str(file.resolve()),
                "files": [[file.name, st.st_size, st.st_ino, st.st_mtime_ns]]}

    def digest() -> str:
        with open(file, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return _remembered_sha256(key, digest, str(file))


def _remembered_sha256(key_of, digest, path: str) -> str:
    """`digest()`, remembered under `key_of()` (a stat key whose "files" end with each file's mtime): recalled
    when the key is unchanged, else computed and remembered, unless a file changed while it was read or may
    change unseen within its mtime tick."""
    started = time.time_ns()
    key = key_of()
    found = _recall(key)
    if found is None:
        found = {"path": path, "sha256": digest()}
        newest = max((mtime for *_, mtime in key["files"]), default=0)
        if key_of() == key and newest < started - _SETTLE_NS:
            _remember(key, found)
    return found["sha256"]


def content_sha256(local_dir: str) -> str:
    """SHA-256 over each config, tokenizer and weight file's name and bytes, in name order: reads every byte."""
    digest = hashlib.sha256()
    for file in _content_files(Path(local_dir)):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _content_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _CONTENT_SUFFIXES)


def _local_key(root: Path) -> dict:
    files = []
    for file in _content_files(root):
        st = file.stat()  # follows links: a HF snapshot's files are links to blobs
        files.append([file.name, st.st_size, st.st_ino, st.st_mtime_ns])
    return {"format": _MEMO_FORMAT, "dir": str(root.resolve()), "files": files}


def remote_listing(fs: fsspec.AbstractFileSystem, remote: str) -> list:
    """`[name, size, {version fields}]` for every object under `remote`, from a listing alone (no bytes read)."""
    root = remote.rstrip("/")
    fs.invalidate_cache(root)  # fsspec instances (and their listing caches) live as long as a Ray worker process
    out = []
    for name, info in fs.find(root, detail=True).items():
        relative = name[len(root):].lstrip("/") or Path(name).name
        tags = {f: str(info[f]) for f in _VERSION_FIELDS if info.get(f) is not None}
        out.append([relative, info.get("size"), tags])
    return sorted(out, key=lambda entry: entry[0])


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _memo_file(key: dict) -> Path:
    return cache_root() / "identities" / f"{_digest(key)[:32]}.json"


def _recall(key: dict) -> dict | None:
    """The remembered identity for `key`, or None when there is none or it cannot be trusted."""
    try:
        memo = json.loads(_memo_file(key).read_text())
    except (OSError, ValueError):  # absent, unreadable or corrupt: hash again
        return None
    sha = memo.get("sha256") if isinstance(memo, dict) else None
    valid = isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
    return memo if valid and memo.get("key") == key else None


def _remember(key: dict, identity: dict) -> None:
    """Writes the memo atomically (temp file + rename): a reader sees the old memo, the new one or none."""
    file = _memo_file(key)
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, **identity}, f)
        os.replace(tmp, file)
    except OSError as e:  # a read-only cache costs a rehash next run, not this run
        log.warning("cannot remember the identity of %s: %s", identity["path"], e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
