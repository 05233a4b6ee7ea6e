"""Scores a model already computed, reused across runs: rescoring with a new policy reruns only the policy.

What is cached is one model stage's output for one row, keyed by what decides it: the row's texts, hashed with
the stage's namespace (the model's content hash, dtype, engine and every encoding setting). A new checkpoint or
another `max_length` is another namespace, so it never reads another checkpoint's scores. The key needs no
tokenizer, so hits are found before any model stage runs.

Layout under the cache URI:

    <kind>-<dtype>/<model sha256>/_loads/...               one marker per time the model was actually loaded
    <kind>-<dtype>/<model sha256>/<settings>/gen-<run>/    one generation per run: Parquet, `key`, `value`

No process ever holds the cache. Hits are found in a pass of their own before the model pass
(`mapray.cache_lookup`); the rows are written with their cached values, and each stage scores only the rows
without one. After the model pass, each
namespace gets one generation holding what this run scored (`write_generations`: one Ray Data write for all
namespaces, files of at least `GENERATION_ROWS_PER_FILE` rows), and `compact` merges a namespace's generations
into one.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
from ray.data import Datasink

from mapray import columns as C
from mapray.config import ModelConfig
from mapray.errors import ConfigError
from mapray.uris import move_folder

COMPLETE = "_complete"  # written into a generation once all of its files are in place
FORMAT = 2  # the cache layout and key scheme; part of every namespace, so an older layout is never read
GENERATION_ROWS_PER_FILE = 500_000
ROWS_PER_PARTITION = 250_000  # compaction: a partition of (key, value) rows is held in memory by one task


@dataclass(frozen=True)
class Namespace:
    """Where one model stage's cached values live, and the id its keys are hashed with."""

    role: str  # reward, policy or reference: names the row's cache columns
    root: str  # the cache URI
    store: str  # <kind>-<dtype>
    model_sha: str
    settings: str  # a hash of everything besides the model that changes the values

    @property
    def id(self) -> str:
        return f"{self.store}/{self.model_sha}/{self.settings}"

    @property
    def model_dir(self) -> str:
        return f"{self.root.rstrip('/')}/{self.store}/{self.model_sha}"

    @property
    def data_dir(self) -> str:
        return f"{self.model_dir}/{self.settings}"

    @property
    def value_column(self) -> str:
        return f"_m_cache_{self.role}"  # the row's cached or computed value (internal: never written to scored/)

    @property
    def new_key_column(self) -> str:
        return f"_m_cache_new_{self.role}"  # the key of a value this run computed (null for a hit)

    def generations(self) -> list[str]:
        """The finished generations (a move into place on an object store is a copy: not all there at once)."""
        fs, path = fsspec.core.url_to_fs(self.data_dir)
        if not fs.exists(path):
            return []
        done = fs.glob(f"{path}/gen-*/{COMPLETE}")
        return sorted(fs.unstrip_protocol(p.rsplit("/", 1)[0]) for p in done)

    def stored_files(self) -> list[str]:
        """The Parquet files of every finished generation: what a lookup reads."""
        return [f for g in self.generations() for f in _parquet_files(g)]

    def record_load(self) -> None:
        fs, path = fsspec.core.url_to_fs(f"{self.model_dir}/_loads")
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path}/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}", "w") as f:
            f.write("model loaded\n")

    def loads(self) -> int:
        fs, path = fsspec.core.url_to_fs(f"{self.model_dir}/_loads")
        return len(fs.ls(path)) if fs.exists(path) else 0


def namespace(cache_uri: str, role: str, kind: str, cfg: ModelConfig, model_sha: str) -> Namespace:
    # everything that changes the token ids a row becomes, or the numbers a model gives for them
    settings = {"format": FORMAT, "engine": cfg.engine, "max_length": cfg.max_length,
                "truncation_mode": cfg.truncation_mode, "split_special_tokens": cfg.split_special_tokens,
                "chat_template": cfg.chat_template}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Namespace(role, cache_uri, f"{kind}-{cfg.dtype}", model_sha, f"v{FORMAT}-{digest}")


def row_keys(table: pa.Table, ns: Namespace, pick: str | None) -> list[str | None]:
    """Each good row's key in `ns`, from its normalized texts (null for a rejected row).

    A candidates row whose pair a reward model picks (`pick`: that reward namespace's id) is keyed by all of its
    candidates and the picking model, not by the pair: the pair is not known until the rewards are, and the
    lookup runs before any model. Every other row is keyed by its prompt and its two completions."""
    prompts, chosen, rejected, candidates = (table.column(c).to_pylist()
                                             for c in (C.PROMPT, C.CHOSEN, C.REJECTED, C.CANDIDATES))
    reject = table.column(C.REJECT).to_pylist()
    keys: list[str | None] = []
    for i in range(table.num_rows):
        if reject[i] is not None:
            keys.append(None)
        elif candidates[i] is not None and (ns.role.startswith("reward") or pick is not None):
            keys.append(_key(ns.id, "candidates", pick or "", prompts[i], candidates[i]))
        else:
            keys.append(_key(ns.id, "pair", prompts[i], chosen[i], rejected[i]))
    return keys


def _key(*parts: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        digest.update(data)
    return digest.hexdigest()


def _first_per(table: pa.Table, column: str) -> pa.Table:
    """The first of the rows that share a value of `column`. After a join: a row repeated for each match, which
    all land in the same partition, hence the same block. In a generation: two rows of one run with the same
    texts."""
    if table.num_rows == 0:
        return table
    _, first = np.unique(table.column(column).to_numpy(zero_copy_only=False), return_index=True)
    return table if len(first) == table.num_rows else table.take(pa.array(np.sort(first)))


def _parquet_files(folder: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(folder)
    return [fs.unstrip_protocol(f) for f in fs.find(path) if f.endswith(".parquet")]


# --- in a stage: cached values where the lookup found them, the model for the rest ---

def cached_values(table: pa.Table, ns: Namespace | None) -> list[list[float] | None]:
    """The value the lookup attached to each row (None everywhere without a cache or a lookup)."""
    if ns is None or ns.value_column not in table.column_names:
        return [None] * table.num_rows
    return table.column(ns.value_column).to_pylist()


def with_values(table: pa.Table, ns: Namespace | None, values: list, new_keys: list) -> pa.Table:
    """Records each row's value, and the key of every value computed here (what `write_generations` stores)."""
    if ns is None:
        return table
    table = C.set_column(table, ns.value_column, values, pa.list_(pa.float64()))
    return C.set_column(table, ns.new_key_column, new_keys, pa.string())


# --- storing: one generation per run, compaction of many into one ---

def write_generations(rows, namespaces: list[Namespace], name: str) -> None:
    """What the run computed in each namespace (rows with a new key), as that namespace's generation
    `gen-<name>`, all in one pass over `rows` (`GenerationSink`). Each is written beside its place and renamed: a
    lookup lists only finished generations. A generation that exists already is left as it is, so a resumed run
    can call this again."""
    todo, places = {}, set()
    for ns in namespaces:
        if ns.data_dir in places:  # one checkpoint twice (two reductions of one multi-label head): same values
            continue
        places.add(ns.data_dir)
        fs, path = fsspec.core.url_to_fs(f"{ns.data_dir}/gen-{name}")
        if fs.exists(f"{path}/{COMPLETE}"):
            continue
        if fs.exists(path):  # a move cut short
            fs.rm(path, recursive=True)
        todo[ns.role] = (ns, fs, path, f"{path.rsplit('/', 1)[0]}/.tmp-{uuid.uuid4().hex}")
    if not todo:
        return
    columns = [c for ns, *_ in todo.values() for c in (ns.new_key_column, ns.value_column)]
    sink = GenerationSink({role: (ns.new_key_column, ns.value_column, fs.unstrip_protocol(tmp))
                           for role, (ns, fs, _, tmp) in todo.items()})
    rows.select_columns(columns).write_datasink(sink)
    for _, fs, path, tmp in todo.values():
        if fs.exists(tmp):  # nothing computed: no file, and no generation is needed
            move_folder(fs, tmp, path)
            fs.touch(f"{path}/{COMPLETE}")


class GenerationSink(Datasink):
    """Ray Data datasink: per namespace, the rows of a write's blocks with a new key as (`key`, `value`), each
    key once per write, one Parquet file per namespace and write task (named by the task: a retried task
    overwrites its own). Ray Data gathers at least `GENERATION_ROWS_PER_FILE` rows into a write."""

    def __init__(self, targets: dict[str, tuple[str, str, str]]):
        self.targets = targets  # role -> (new key column, value column, folder)
        self.prefix = uuid.uuid4().hex[:12]

    @property
    def min_rows_per_write(self) -> int:
        return GENERATION_ROWS_PER_FILE

    def write(self, blocks, ctx) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        if not tables:
            return
        table = pa.concat_tables(tables)
        for key, value, folder in self.targets.values():
            fresh = table.filter(pc.is_valid(table.column(key))).select([key, value]).rename_columns(["key", "value"])
            fresh = _first_per(fresh, "key")
            if fresh.num_rows:
                fs, path = fsspec.core.url_to_fs(folder)
                fs.makedirs(path, exist_ok=True)
                with fs.open(f"{path}/{self.prefix}_{ctx.task_idx:06d}.parquet", "wb") as f:
                    pq.write_table(fresh, f)


def compact(ns: Namespace) -> int:
    """Merges every generation of `ns` into one (each key once) and deletes the old ones; returns how many
    generations were merged. Run it while no run is reading this cache (e.g. from the scheduled job's guard)."""
    import ray.data

    old = ns.generations()
    if len(old) < 2:
        return 0
    from mapray.runtime import hash_shuffled

    with hash_shuffled():  # the merge repartitions by key
        ds = ray.data.read_parquet([f for g in old for f in _parquet_files(g)])
    partitions = max(1, -(-ds.count() // ROWS_PER_PARTITION))
    merged = ds.repartition(partitions, keys=["key"]).map_batches(_first_per, fn_args=("key",),
                                                                    batch_format="pyarrow", batch_size=None)
    _write_renamed(merged, f"{ns.data_dir}/gen-compact-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")
    fs, _ = fsspec.core.url_to_fs(ns.data_dir)
    for g in old:
        fs.rm(fsspec.core.url_to_fs(g)[1], recursive=True)
    return len(old)


def namespaces_under(cache_uri: str) -> list[Namespace]:
    """Every namespace stored under `cache_uri` (checked before Ray starts: a wrong URI is one line)."""
    fs, root = fsspec.core.url_to_fs(cache_uri)
    if not fs.isdir(root):
        raise ConfigError(f"cache: no cache at {cache_uri}")
    folders = sorted(fs.glob(f"{root.rstrip('/')}/*/*/v{FORMAT}-*"))
    return [Namespace("", cache_uri, *folder.rstrip("/").split("/")[-3:]) for folder in folders]


def _write_renamed(ds, final: str) -> None:
    fs, path = fsspec.core.url_to_fs(final)
    tmp = f"{path.rsplit('/', 1)[0]}/.tmp-{uuid.uuid4().hex}"
    ds.write_parquet(fs.unstrip_protocol(tmp), min_rows_per_file=GENERATION_ROWS_PER_FILE)
    if not fs.exists(tmp):  # nothing computed: Ray writes no file for no rows, and no generation is needed
        return
    move_folder(fs, tmp, path)
    fs.touch(f"{path}/{COMPLETE}")
