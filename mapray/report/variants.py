"""What the report compares: one `Variant` per selection it recomputes (a metric, an alpha, the pool as scored or
with the noise audit's labels swapped, a rule), and the score of a block of rows under each. Pure numpy, no Ray.

The scores are `metrics.map_forms` and `metrics.selection_score`, the global pass's own functions, so the run's
own metric and alpha reproduce its `selected` column. Swapping a pair's chosen and rejected responses changes the
sign of both margins (m_ex -> -m_ex, m_im -> -m_im) and nothing else a score reads; the swapped pool has its own
moments for map_z.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass

import numpy as np

from mapray import columns as C
from mapray import metrics
from mapray.config import SelectionConfig, SelectionMetric
from mapray.report.reward_audit import Bias

METRICS: tuple[str, ...] = typing.get_args(SelectionMetric)
ALPHA_METRICS = C.MAP_FORMS  # the metrics alpha reaches
FLIP, RANDOM, SAMPLE = "_r_flip", "_r_random", "_r_sample"  # per-row values the report adds once


@dataclass(frozen=True)
class Variant:
    group: str  # "overlap", "alpha", "noise" or "bias"
    metric: str
    alpha: float
    rule: tuple[str, float]  # ("ratio", r), ("top_k", k) or ("threshold", t), as SelectionConfig.rule
    flipped: bool = False  # scored on the pool with the noise audit's pairs swapped
    bias: Bias | None = None  # the reward-bias audit's explicit margin in place of the run's

    @property
    def pool_key(self):
        """Which pool moments its map_z z-scores over (the report's `Context.pools`)."""
        return self.bias if self.bias is not None else self.flipped

    def config(self, seed: int) -> SelectionConfig:
        name, value = self.rule
        return SelectionConfig(metric=self.metric, seed=seed, **{name: int(value) if name == "top_k" else value})


def plan(run: SelectionConfig, alpha: float, selected: int, alphas: tuple[float, ...]) -> list[Variant]:
    """The overlap table and the noise audit keep as many rows as the run: its own rule when that ranks, else
    its selected count (a threshold on one metric means nothing on another). The alpha sweep applies the run's
    rule to the run's metric, or to map_z when alpha does not reach the run's metric."""
    rule = run.rule
    same_size = same_size_rule(run, selected)
    swept = run.metric if run.metric in ALPHA_METRICS else C.MAP_Z
    return ([Variant("overlap", m, alpha, same_size) for m in METRICS]
            + [Variant("alpha", swept, a, rule) for a in alphas]
            + [Variant("noise", m, alpha, same_size, flipped=True) for m in METRICS])


def same_size_rule(run: SelectionConfig, selected: int) -> tuple[str, float]:
    """The run's rule where it ranks, else its selected count (a threshold on one score means nothing on
    another)."""
    return run.rule if run.rule[0] != "threshold" else ("top_k", selected)


def margins(cols: dict[str, np.ndarray], flipped: bool) -> tuple[np.ndarray, np.ndarray]:
    m_ex, m_im = cols[C.EXPLICIT_MARGIN], cols[C.IMPLICIT_MARGIN]
    if not flipped:
        return m_ex, m_im
    return np.where(cols[FLIP], -m_ex, m_ex), np.where(cols[FLIP], -m_im, m_im)


def score(v: Variant, cols: dict[str, np.ndarray], pools: dict[bool, metrics.PoolMoments]) -> np.ndarray:
    """The value `v` ranks the rows of a block by (higher kept), as the global pass computes it."""
    if v.metric == "random":  # seeded by pair_id alone: computed once per row (RANDOM), swapping leaves it
        return cols[RANDOM]
    if v.bias is not None:
        m_ex, m_im = v.bias.apply(cols), cols[C.IMPLICIT_MARGIN]
    else:
        m_ex, m_im = margins(cols, v.flipped)
    forms = metrics.map_forms(m_ex, m_im, v.alpha, pools[v.pool_key])
    return metrics.selection_score(v.metric, {**forms, C.EXPLICIT_MARGIN: m_ex, C.IMPLICIT_MARGIN: m_im})


def report_uniforms(pair_ids: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two values in [0, 1) per pair from (seed, pair_id) alone: which pairs the noise audit swaps and which
    the figures sample. Salted apart from `metrics.seeded_uniform`, so the swapped pairs are not the ones the
    random metric ranks first when the seeds agree."""
    flip, sample = np.empty(len(pair_ids)), np.empty(len(pair_ids))
    for i, pid in enumerate(pair_ids):
        h = hashlib.blake2b(f"mapray-report:{seed}:{pid}".encode(), digest_size=16).digest()
        flip[i] = int.from_bytes(h[:8], "big") / 2.0**64
        sample[i] = int.from_bytes(h[8:], "big") / 2.0**64
    return flip, sample
