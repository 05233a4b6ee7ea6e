"""The report's arithmetic on histograms and counts: pure numpy, no Ray, each merged exactly across blocks.

A ranked score is binned on edges at quantiles of a bounded sample (every distinct value when the sample has few),
so a bin holds about n / bins rows whatever the score's scale. Per bin the blocks report a count per group
(unflipped, flipped) and the smallest and largest value seen; counts add and extremes take min / max, so the merge
is exact and independent of how the pool is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


@dataclass
class Hist:
    """Per bin of one score: rows per group (0 unflipped, 1 flipped) and the extremes seen."""

    counts: np.ndarray  # (2, nbins) int64
    lo: np.ndarray  # (nbins,) float64, +inf where empty
    hi: np.ndarray  # (nbins,) float64, -inf where empty

    @classmethod
    def of(cls, scores: np.ndarray, flipped: np.ndarray, edges: np.ndarray) -> Hist:
        nbins = edges.size + 1
        idx = bin_index(scores, edges)
        counts = np.stack([np.bincount(idx[~flipped], minlength=nbins), np.bincount(idx[flipped], minlength=nbins)])
        lo, hi = np.full(nbins, np.inf), np.full(nbins, -np.inf)
        np.minimum.at(lo, idx, scores)
        np.maximum.at(hi, idx, scores)
        return cls(counts.astype(np.int64), lo, hi)

    def merge(self, other: Hist) -> Hist:
        return Hist(self.counts + other.counts, np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi))


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


def auc_flipped_below(hist: Hist) -> tuple[float | None, float | None]:
    """P(an unflipped row scores above a flipped one) + P(tie) / 2, by a rank sum over the bins, and a bound on
    its error: pairs in one bin count 1/2 each, which is exact only where the bin holds a single value."""
    unflipped, flipped = hist.counts.astype(np.float64)
    n_u, n_f = unflipped.sum(), flipped.sum()
    if n_u == 0 or n_f == 0:
        return None, None
    flipped_below = np.cumsum(flipped) - flipped
    same_bin = unflipped * flipped
    auc = (np.sum(unflipped * flipped_below) + 0.5 * same_bin.sum()) / (n_u * n_f)
    mixed = hist.lo < hist.hi  # a bin whose values differ: its pairs may be ordered either way
    return float(auc), float(0.5 * same_bin[mixed].sum() / (n_u * n_f))


def jaccard(gram: np.ndarray) -> np.ndarray:
    """Jaccard index of every pair of sets from their intersection counts (gram[i, i] = |A_i|); NaN where both
    sets are empty."""
    sizes = np.diag(gram).astype(np.float64)
    union = sizes[:, None] + sizes[None, :] - gram
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, gram / np.where(union > 0, union, 1), np.nan)
