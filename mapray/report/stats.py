"""The report's arithmetic on histograms and counts: pure numpy, no Ray, each merged exactly across blocks.

A ranked score is binned as the selection bins it (`mapray.histograms`). Per bin the blocks report a count per group
(unflipped, flipped) and the smallest and largest value seen; counts add and extremes take min / max, so the merge
is exact and independent of how the pool is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapray.histograms import bin_index


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
