"""A model's identity is hashed once and remembered under its files' stat (local) or listing (remote)."""

import builtins
import hashlib
import importlib.metadata
import json
import os
import struct
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from mapray import models

HOUR_NS = 3600 * 10**9
FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}',
         "model.safetensors": bytes(range(256)) * 64}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MAPRAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Names of every file opened through `open` from now on."""
    names, real_open = [], builtins.open

    def spy(file, *args, **kwargs):
        names.append(Path(file).name if isinstance(file, str | os.PathLike) else str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return names


def checkpoint(root: Path, files: dict[str, bytes] = FILES, age_ns: int = HOUR_NS) -> Path:
    """A checkpoint folder whose files were last written `age_ns` ago, plus files the identity must ignore."""
    root.mkdir(parents=True)
    then = time.time_ns() - age_ns
    for name, data in files.items():
        (root / name).write_bytes(data)
        os.utime(root / name, ns=(then, then))
    (root / "README.md").write_text("not content")
    (root / "nested").mkdir()
    (root / "nested" / "extra.json").write_text("{}")
    return root


def plain_sha(files: dict[str, bytes]) -> str:
    """The identity as computed before it was remembered: name then bytes of each content file, in name order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + files[name])
    return digest.hexdigest()


def test_identity_is_the_plain_content_hash(tmp_path):
    ck = checkpoint(tmp_path / "ck")
    assert models.model_identity(str(ck)) == {"path": str(ck), "sha256": plain_sha(FILES)}
    assert models.model_identity(str(ck))["sha256"] == plain_sha(FILES)  # and from the memo


def test_second_call_reads_no_content_and_trusts_the_stat(tmp_path, opened):
    ck = checkpoint(tmp_path / "ck")
    first = models.model_identity(str(ck))
    assert set(FILES) <= set(opened)
    opened.clear()
    assert models.model_identity(str(ck)) == first
    assert not set(FILES) & set(opened)

    # same size, same inode, mtime put back: the stat cannot tell, so the remembered identity stands
    weights = ck / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(bytes(reversed(FILES["model.safetensors"])))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert models.model_identity(str(ck))["sha256"] == first["sha256"]
    assert models.content_sha256(str(ck)) != first["sha256"]


def test_changed_weights_change_the_identity(tmp_path):
    ck = checkpoint(tmp_path / "ck")
    before = models.model_identity(str(ck))["sha256"]
    changed = {**FILES, "model.safetensors": bytes(reversed(FILES["model.safetensors"]))}
    (ck / "model.safetensors").write_bytes(changed["model.safetensors"])  # same size, new mtime
    after = models.model_identity(str(ck))["sha256"]
    assert after == plain_sha(changed) != before


def test_a_new_content_file_changes_the_identity(tmp_path):
    ck = checkpoint(tmp_path / "ck")
    before = models.model_identity(str(ck))["sha256"]
    (ck / "chat_template.jinja").write_bytes(b"{{ messages }}")
    after = models.model_identity(str(ck))["sha256"]
    assert after == plain_sha({**FILES, "chat_template.jinja": b"{{ messages }}"}) != before


def test_freshly_written_files_are_hashed_but_not_remembered(tmp_path, opened):
    ck = checkpoint(tmp_path / "ck", age_ns=0)  # could still change within its mtime tick
    models.model_identity(str(ck))
    opened.clear()
    assert models.model_identity(str(ck))["sha256"] == plain_sha(FILES)
    assert "model.safetensors" in opened


@pytest.mark.parametrize("memo", [b"{not json", b"", b'{"key": 1, "sha256": "x"}', b"\xff\xfe"])
def test_a_corrupt_memo_is_recomputed(tmp_path, cache, opened, memo):
    ck = checkpoint(tmp_path / "ck")
    models.model_identity(str(ck))
    [memo_file] = (cache / "identities").iterdir()
    memo_file.write_bytes(memo)
    opened.clear()
    assert models.model_identity(str(ck))["sha256"] == plain_sha(FILES)
    assert "model.safetensors" in opened
    assert json.loads(memo_file.read_text())["sha256"] == plain_sha(FILES)  # rewritten whole


def test_a_memo_for_other_files_is_not_trusted(tmp_path, cache):
    """A memo is checked against its full key, not only found by the key's hash."""
    ck = checkpoint(tmp_path / "ck")
    models.model_identity(str(ck))
    [memo_file] = (cache / "identities").iterdir()
    memo = json.loads(memo_file.read_text())
    memo["key"]["files"][0][1] += 1
    memo["sha256"] = "0" * 64
    memo_file.write_text(json.dumps(memo))
    assert models.model_identity(str(ck))["sha256"] == plain_sha(FILES)


@pytest.fixture
def remote(monkeypatch) -> tuple[str, MemoryFileSystem, list[str]]:
    """A checkpoint on fsspec's in-process memory filesystem, and the sources of every `get` from it."""
    uri = f"memory://mapray-test-{uuid.uuid4().hex}/ck"
    fs, root = fsspec.core.url_to_fs(uri)
    for name, data in FILES.items():
        fs.pipe(f"{root}/{name}", data)
    copies, real_get = [], MemoryFileSystem.get

    def get(self, rpath, *args, **kwargs):
        copies.append(rpath)
        return real_get(self, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get", get)
    yield uri, fs, copies
    fs.rm(root, recursive=True)


def test_remote_checkpoint_is_copied_once_per_version(remote, cache):
    uri, fs, copies = remote
    first = models.resolve_model_path(uri)
    assert len(copies) == 1 and models.content_sha256(first) == plain_sha(FILES)
    assert models.resolve_model_path(uri) == first and len(copies) == 1

    time.sleep(0.01)  # memory fs versions by creation time: make it differ
    changed = {**FILES, "model.safetensors": bytes(reversed(FILES["model.safetensors"]))}
    fs.pipe(f"{fs._strip_protocol(uri)}/model.safetensors", changed["model.safetensors"])  # in place, same size
    second = models.resolve_model_path(uri)
    assert second != first and len(copies) == 2
    assert models.content_sha256(second) == plain_sha(changed)
    assert models.content_sha256(first) == plain_sha(FILES)  # the old copy stays as it was


def test_remote_identity_needs_no_copy_on_a_rerun(remote, cache, opened):
    uri, fs, copies = remote
    first = models.identify_model(uri)
    assert first["sha256"] == plain_sha(FILES) and len(copies) == 1
    for copy in (cache / "remote").iterdir():  # the driver's copy is gone: the listing alone must do
        for file in copy.iterdir():
            file.unlink()
        copy.rmdir()
    opened.clear()
    assert models.identify_model(uri) == first
    assert len(copies) == 1 and not set(FILES) & set(opened)

    time.sleep(0.01)
    changed = {**FILES, "config.json": b'{"model_type": "qwen2"}'}
    fs.pipe(f"{fs._strip_protocol(uri)}/config.json", changed["config.json"])
    second = models.identify_model(uri)
    assert second["sha256"] == plain_sha(changed) != first["sha256"]
    assert second["path"] == models.resolve_model_path(uri) and len(copies) == 2


def test_remote_gguf_file_is_keyed_by_its_listing(cache):
    uri = f"memory://mapray-test-{uuid.uuid4().hex}/m.gguf"
    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe(path, b"GGUF v1")
    try:
        first = models._copy_remote(uri)
        assert Path(first).name == "m.gguf" and Path(first).read_bytes() == b"GGUF v1"
        assert models._copy_remote(uri) == first
        time.sleep(0.01)
        fs.pipe(path, b"GGUF v2")
        second = models._copy_remote(uri)
        assert second != first and Path(second).read_bytes() == b"GGUF v2"
    finally:
        fs.rm(path)


def test_listing_reads_version_fields_not_bytes():
    listing = [["config.json", 2, {"ETag": '"abc"', "LastModified": "2026-01-01"}]]

    class Store(MemoryFileSystem):
        def find(self, path, detail=False, **kwargs):
            return {f"{path}/config.json": {"name": f"{path}/config.json", "size": 2, "type": "file",
                                             "ETag": '"abc"', "LastModified": "2026-01-01", "StorageClass": "X"}}

        def cat_file(self, *args, **kwargs):
            raise AssertionError("a listing must not read bytes")

    assert models.remote_listing(Store(), "bucket/ck/") == listing


def test_a_gguf_file_is_converted_once_whatever_its_path(cache, tmp_path, opened, caplog):
    """The dequantized checkpoint is keyed by the GGUF's bytes: the same file in a new virtual environment (another
    path, another mtime) finds it; a changed file does not, nor does another transformers (its key names the
    version). The bytes are hashed once per path and stat."""
    caplog.set_level("INFO", logger="mapray")
    data = b"GGUF v1" * 1000
    first, moved = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for file in (first, moved):
        file.parent.mkdir()
        file.write_bytes(data)
    then = time.time_ns() - HOUR_NS
    os.utime(first, ns=(then, then))
    converter = f"{models._GGUF_CONVERSION}:{importlib.metadata.version('transformers')}"
    key = hashlib.sha256(f"{hashlib.sha256(data).hexdigest()}:{converter}".encode()).hexdigest()[:16]
    converted = cache / "gguf" / f"m-{key}"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # as a first run left it: no conversion runs below
    assert models.resolve_model_path(str(first)) == str(converted)
    assert models.resolve_model_path(str(moved)) == str(converted)
    assert opened.count("m.gguf") == 2
    assert models.resolve_model_path(str(first)) == str(converted) and opened.count("m.gguf") == 2  # remembered
    assert "dequantizing" not in caplog.text
    moved.write_bytes(b"GGUF v2")
    with pytest.raises(struct.error):  # these bytes are no GGUF
        models.resolve_model_path(str(moved))
    assert f"dequantizing {moved} into {cache / 'gguf' / 'm-'}" in caplog.text  # another file: converted afresh
