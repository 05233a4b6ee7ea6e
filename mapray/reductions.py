"""Ray Data passes that end in one small result: a function over every batch of a Dataset, the partial results
merged on the driver as they arrive (`reduce`), and the k-th best row of a ranked Dataset (`kth_best`). What
reaches the driver is what the functions return (moments, histograms, a bounded sample), never the pool.
"""

from __future__ import annotations

import pickle

import pyarrow as pa

BATCH_ROWS = 262_144  # rows a batch function sees at once: a few MB per numeric column


def merge(a, b):
    """Merges two partial results of the same shape: numbers and arrays add, dicts merge by key, lists pairwise,
    tables concatenate, objects with a `merge` (moments, histograms) merge as they define; None is no result."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, dict):
        return {k: merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in [*a, *b.keys() - a.keys()]}
    if isinstance(a, list):
        return [merge(x, y) for x, y in zip(a, b)]
    if isinstance(a, pa.Table):
        return pa.concat_tables([a, b])
    if hasattr(a, "merge"):
        return a.merge(b)
    return a + b


def reduce(ds, fn, **kwargs):
    """`fn(table, **kwargs)` over every batch of `ds`, each partial result merged into one as it arrives (None
    for an empty Dataset)."""
    def wrapped(table: pa.Table) -> pa.Table:
        return pa.table({"blob": pa.array([pickle.dumps(fn(table, **kwargs))], pa.binary())})

    total = None
    for row in ds.map_batches(wrapped, batch_format="pyarrow", batch_size=BATCH_ROWS).iter_rows():
        total = merge(total, pickle.loads(row["blob"]))
    return total


def kth_best(ranked, columns: list[str], k: int) -> dict:
    """The k-th row of `ranked` in the order of `columns` (the first descending, the rest ascending: a score and
    its tie-breakers), by Ray's distributed sort: for a cut-off whose bin is too large to collect (a heavy tie)."""
    rows = ranked.select_columns(columns).sort(columns, descending=[True] + [False] * (len(columns) - 1)).limit(k)
    last = None
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=65536):
        last = batch.slice(batch.num_rows - 1).to_pylist()[0] if batch.num_rows else last
    return last
