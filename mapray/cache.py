"""Scores a model already computed, reused across runs: rescoring with a new policy reruns only the policy.

Layout under the cache URI: `<kind>-<dtype>/<model sha256>/part-*.parquet` with columns `key` (a hash of the
exact token ids scored) and `value` (the scores of that row: two log-prob sums, or one reward per sequence).
The model's content hash (the manifest's identity) changes with any change to its weights, config or
tokenizer, so a new checkpoint never reads an old checkpoint's scores. Each actor loads its model's entries
once (tens of bytes a row: millions of rows fit) and adds a part file per batch it had to score. A model that
is actually loaded leaves a marker under `_loads/`, so "not run at all on a full cache hit" is checkable.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

Group = Sequence  # one row's sequences: token-id lists, or (prompt ids, response ids) pairs


class ScoreCache:
    def __init__(self, uri: str, kind: str, dtype: str, model_sha: str):
        self.fs, self.path = fsspec.core.url_to_fs(f"{uri.rstrip('/')}/{kind}-{dtype}/{model_sha}")
        self.values: dict[str, list[float]] = {}
        if self.fs.exists(self.path):
            for file in self.fs.find(self.path):
                if file.endswith(".parquet"):
                    table = pq.read_table(file, filesystem=self.fs)
                    self.values.update(zip(table.column("key").to_pylist(), table.column("value").to_pylist()))

    @staticmethod
    def key(group: Group) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for item in group:
            for ids in item if isinstance(item, tuple) else (item,):
                digest.update(np.asarray(ids, dtype=np.int64).tobytes())
                digest.update(b"|")
            digest.update(b"#")
        return digest.hexdigest()

    def put(self, entries: dict[str, list[float]]) -> None:
        """One part file, written under a temporary name and renamed, so a reader never sees half of it."""
        if not entries:
            return
        self.values.update(entries)
        self.fs.makedirs(self.path, exist_ok=True)
        table = pa.table({"key": list(entries), "value": pa.array(list(entries.values()), pa.list_(pa.float64()))})
        name = f"{self.path}/part-{uuid.uuid4().hex}"
        with self.fs.open(f"{name}.tmp", "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(f"{name}.tmp", f"{name}.parquet")

    def record_load(self) -> None:
        self.fs.makedirs(f"{self.path}/_loads", exist_ok=True)
        with self.fs.open(f"{self.path}/_loads/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}", "w") as f:
            f.write("model loaded\n")

    def loads(self) -> int:
        folder = f"{self.path}/_loads"
        return len(self.fs.ls(folder)) if self.fs.exists(folder) else 0


def cached_scores(groups: list[Group], score: Callable[[list], list[float]],
                  cache: ScoreCache | None) -> list[list[float]]:
    """Scores of each group (one value per sequence): from the cache where present, the rest through `score`
    in one call, then stored. Naive equivalent: [score(g) for g in groups]."""
    out: list[list[float] | None] = [None] * len(groups)
    todo = []
    for i, group in enumerate(groups):
        key = cache.key(group) if cache is not None else None
        hit = cache.values.get(key) if cache is not None else None
        if hit is not None and len(hit) == len(group):
            out[i] = hit
        else:
            todo.append((i, key))
    if todo:
        values = iter(score([seq for i, _ in todo for seq in groups[i]]))
        for i, _ in todo:
            out[i] = [next(values) for _ in groups[i]]
        if cache is not None:
            cache.put({key: out[i] for i, key in todo})
    return out
