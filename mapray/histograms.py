"""Ranking a score over a pool too large to sort on one machine: quantile bins, counts per bin, the bin that
holds the k-th best row. Pure numpy, no Ray; counts merge exactly across blocks (they add).

A score is binned on edges at quantiles of a bounded sample (every distinct value when the sample has few), so a
bin holds about n / bins rows whatever the score's scale: the k-th best row is then found among the rows of one
bin. The selection's global pass (`mapray.selection`) and the report (`mapray.report`) both rank this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLLECT_LIMIT = 200_000  # rows of one cut-off bin the driver sorts itself; more go through Ray's sort


def rank_edges(sample: np.ndarray, bins: int) -> np.ndarray:
    """Sorted bin edges: every distinct finite value of the sample when there are at most `bins`, else `bins`
    quantiles of it (duplicates merged, so a heavy tie is one bin)."""
    values = np.sort(np.asarray(sample, dtype=np.float64)[np.isfinite(sample)])
    distinct = np.unique(values)
    if distinct.size <= bins:
        return distinct
    return np.unique(values[np.linspace(0, values.size - 1, bins).round().astype(np.int64)])


def bin_index(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0 for scores below edges[0], i for [edges[i-1], edges[i]), len(edges) for edges[-1] and above."""
    return np.searchsorted(edges, scores, side="right")


def bin_counts(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Rows per bin (len(edges) + 1 bins, `bin_index`'s)."""
    return np.bincount(bin_index(scores, edges), minlength=edges.size + 1).astype(np.int64)


@dataclass(frozen=True)
class TopBin:
    """Where the k-th best row lies: its bin, how many rows of that bin are kept, and the bin's size."""

    bin: int
    keep: int
    size: int


def top_bin(counts: np.ndarray, k: int) -> TopBin:
    """The bin holding the k-th highest score (1 <= k <= total), counting bins from the top."""
    from_top = np.cumsum(counts[::-1])
    j = int(np.searchsorted(from_top, k))  # the first bin from the top whose running total reaches k
    b = counts.size - 1 - j
    return TopBin(b, k - int(from_top[j] - counts[b]), int(counts[b]))


def bin_bounds(edges: np.ndarray, b: int) -> tuple[float, float]:
    """[lo, hi) of bin b (infinite at the ends)."""
    lo = -np.inf if b == 0 else float(edges[b - 1])
    hi = np.inf if b == edges.size else float(edges[b])
    return lo, hi
