"""Finding a pool's cached scores, in a pass of its own before the model pass, without a shuffle: the pool's keys
(a narrow table, in Ray's object store) filter each namespace's stored generations down to the pool's hits, and
the hits are attached to the rows by key. (Ray Data joins did this before: two shuffles per namespace, ~10 s of
fixed cost on 40 pairs, more than a warm rescore saved.) What is cached and where: `mapray.cache`.
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa

from mapray import columns as C
from mapray.cache import Namespace, row_keys


def attach_hits(rows, lookups: list[tuple[Namespace, str | None, list[str]]], schema: pa.Schema):
    """`rows` (of `schema`) with each namespace's cached values in its value column (null where there is none).

    `lookups`: each namespace with stored values, its `pick` (see `row_keys`) and its `stored_files()`. No shuffle:
    the pool's keys (a narrow table) are computed once and stay in Ray's object store; the tasks that read the
    stored generations keep the values of those keys only (the hits: at most one per row and namespace); the
    tasks that read the rows take their values from the hits by key (each task holds the hits: a key and a few
    floats per row of the pool)."""
    import ray.data

    picks = [(ns, pick) for ns, pick, _ in lookups]
    key_columns = {ns.role: _key_column(ns) for ns, _ in picks}
    keys = rows.map_batches(partial(_key_table, lookups=picks, names=key_columns), batch_format="pyarrow")
    key_refs = keys.materialize().to_arrow_refs()  # in the object store: the driver never holds them
    # every namespace's stored generations in one execution, each keeping the hits of its own keys
    found = [ray.data.read_parquet(files).map_batches(partial(_hits, key_refs=key_refs, role=ns.role,
                                                              column=key_columns[ns.role]), batch_format="pyarrow")
             for ns, _, files in lookups]
    hits = (found[0].union(*found[1:]) if len(found) > 1 else found[0]).materialize()
    target = pa.schema([*schema, *(pa.field(ns.value_column, pa.list_(pa.float64())) for ns, _ in picks)])
    return rows.map_batches(partial(_with_hits, hit_refs=hits.to_arrow_refs(), lookups=picks, target=target),
                            batch_format="pyarrow")


def _key_column(ns: Namespace) -> str:
    return f"_m_cache_key_{ns.role}"


def _key_table(table: pa.Table, lookups, names: dict) -> pa.Table:
    out = {C.ROW: table.column(C.ROW)}
    for ns, pick in lookups:
        out[names[ns.role]] = pa.array(row_keys(table, ns, pick), pa.string())
    return pa.table(out)


_FETCHED: dict = {}  # per worker process: the tables behind object refs a task fetched (every batch needs them)


def _fetched(refs: list) -> pa.Table | None:
    import ray

    token = tuple(ref.hex() for ref in refs)
    if token not in _FETCHED:
        _FETCHED.clear()  # one run's tables at a time
        tables = [t for t in ray.get(refs) if t.num_rows]
        _FETCHED[token] = pa.concat_tables(tables, promote_options="default") if tables else None
    return _FETCHED[token]


HITS = pa.schema([("role", pa.string()), ("key", pa.string()), ("value", pa.list_(pa.float64()))])


def _hits(table: pa.Table, key_refs: list, role: str, column: str) -> pa.Table:
    """The stored (key, value) rows of namespace `role` whose key a row of the pool has (`column` of the keys)."""
    import pyarrow.compute as pc

    keys = _fetched(key_refs)
    if keys is None:
        return HITS.empty_table()
    table = table.filter(pc.is_in(table.column("key"), value_set=keys.column(column).drop_null()))
    return pa.table({"role": pa.array([role] * table.num_rows, pa.string()),
                     "key": table.column("key").cast(pa.string()),
                     "value": table.column("value").cast(pa.list_(pa.float64()))}, schema=HITS)


def _with_hits(table: pa.Table, hit_refs: list, lookups, target: pa.Schema) -> pa.Table:
    """A block of rows with each namespace's value found by its key (the first stored, where two runs stored one
    key), null where none was."""
    import pyarrow.compute as pc

    hits = _fetched(hit_refs)
    for ns, pick in lookups:
        mine = hits.filter(pc.equal(hits.column("role"), ns.role)) if hits is not None else None
        keys = pa.array(row_keys(table, ns, pick), pa.string())
        if mine is None or mine.num_rows == 0:
            values = pa.nulls(table.num_rows, pa.list_(pa.float64()))
        else:
            values = mine.column("value").take(pc.index_in(keys, value_set=mine.column("key")))
        table = C.set_column(table, ns.value_column, values, pa.list_(pa.float64()))
    return table.select(target.names).cast(target)
