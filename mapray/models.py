"""Where a model's files are, and what it is.

A model path is a local checkpoint folder, an fsspec URI of one (copied once into the local cache), a `.gguf`
file (dequantized once into the local cache as a HF checkpoint, which both engines load), or
`pkg:PACKAGE/FILE` for a file shipped inside an installed Python package (the demo's SmolLM2). Nothing is
ever fetched from a model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

from mapray.config import ConfigError
from mapray.uris import is_local

log = logging.getLogger(__name__)

_CONTENT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".gguf")


def cache_root() -> Path:
    return Path(os.environ.get("MAPRAY_CACHE", Path.home() / ".cache" / "mapray"))


def check_model_path(path: str, key: str) -> None:
    """Fails fast, before any model loads, when a configured model cannot be found."""
    if path.startswith("pkg:"):
        _package_file(path, key)
        return
    fs, local = fsspec.core.url_to_fs(path)
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
    local = path.removeprefix("file://")
    if local.endswith(".gguf"):
        return _dequantized(Path(local))
    return local


def _copy_remote(uri: str) -> str:
    target = cache_root() / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not target.exists():
        fs, remote = fsspec.core.url_to_fs(uri)
        with _staging_dir(target) as tmp:
            if remote.endswith(".gguf"):
                fs.get(remote, str(tmp / Path(remote).name))
            else:
                fs.get(remote.rstrip("/") + "/", str(tmp), recursive=True)
    files = list(target.glob("*.gguf"))
    return str(files[0]) if uri.endswith(".gguf") else str(target)


def _dequantized(gguf: Path) -> str:
    """GGUF -> fp32 HF checkpoint (transformers reads GGUF but refuses to save a GGUF-loaded model)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, target)
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


def model_identity(local_dir: str) -> dict:
    """Path plus a SHA-256 over the config, tokenizer and weight files: what the manifest and caches key on."""
    digest = hashlib.sha256()
    root = Path(local_dir)
    for file in sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _CONTENT_SUFFIXES):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return {"path": local_dir, "sha256": digest.hexdigest()}
