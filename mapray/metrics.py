"""Margins, implicit rewards, MAP and pool moments: pure numpy, no Ray.

Definitions follow ../shared/PAPER.md (Huang et al., ICML 2025) and the reference code's conventions:
- explicit margin  m_ex = r(x, y_w) - r(x, y_l)
- implicit reward  simpo: (beta / |y|) * log pi(y|x);  dpo: beta * (log pi(y|x) - log pi_ref(y|x))
- implicit margin  m_im = r_hat(x, y_w) - r_hat(x, y_l)
- map       = |m_ex| - alpha * |m_im|         (paper form, per row)
- map_unreg = m_ex - alpha * m_im             (no noise regulariser)
- map_z     = z(m_ex) - alpha * z(|m_im|)      (reference-code form; z over the whole pool, population std)
`map_forms` computes all three from one alpha; the global pass (selection.py) is their only way in, so a
reselection with another alpha changes them together.

Selection metrics from the literature, computed from the two margins alone (`FROM_MARGINS`). Each is written as
the value to rank by, higher kept; sigma(x) = 1 / (1 + exp(-x)).
- explicit_margin        m_ex: larger reward margin, the MAP paper's baseline (Huang et al., arXiv 2503.01864).
- rm_confidence          sigma(m_ex): the reward model's Bradley-Terry probability that y_w beats y_l (its loss in
                         Ouyang et al., arXiv 2203.02155, is -log of it). Ranks as explicit_margin does.
- implicit_margin_small  -|m_im|: pairs the policy cannot yet tell apart (Yang et al., arXiv 2406.17312).
- implicit_margin_large  m_im: SeRA (Ko et al., arXiv 2410.09362) keeps the pairs with the largest implicit reward
                         margin. Our reading (its selection rule's text was not at hand): the signed margin, as
                         "larger margin" reads for m_ex; |m_im| would also rank first the pairs the policy most
                         confidently ranks against their label.
- dpo_loss               -log sigma(m_im): the pair's DPO loss (Rafailov et al., arXiv 2305.18290, eq. 7), hardest
                         pairs first.
- dpo_grad_weight        sigma(-m_im): the pair's weight in the DPO gradient (same paper, section 4). Ranks as
                         dpo_loss does, but saturates at 1.0 below about m_im = -37 (ties: the smaller pair_id).
- rank_disagreement      1 if sign(m_im) != sign(m_ex) else 0: the policy ranks the pair against the reward model
                         (ranking accuracy, Chen et al., arXiv 2405.19534). A zero margin has sign 0. Two values
                         only: within each, the smaller pair_id is kept first.
With `implicit: dpo`, m_im = beta * (the policy's log-ratio margin over the reference), so dpo_loss is exactly the
pair's DPO loss at the run's beta; with `simpo` it is SimPO's loss without its target margin gamma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapray import columns as C


def explicit_margin(reward_chosen: np.ndarray, reward_rejected: np.ndarray) -> np.ndarray:
    return np.asarray(reward_chosen, dtype=np.float64) - np.asarray(reward_rejected, dtype=np.float64)


def implicit_reward(form: str, beta: float, logps: np.ndarray, tokens: np.ndarray,
                    ref_logps: np.ndarray | None = None) -> np.ndarray:
    """Naive equivalent: simpo -> beta * logps / tokens; dpo -> beta * (logps - ref_logps)."""
    logps = np.asarray(logps, dtype=np.float64)
    if form == "simpo":
        return beta * logps / np.asarray(tokens, dtype=np.float64)
    if form == "dpo":
        if ref_logps is None:
            raise ValueError("the dpo implicit reward needs reference log-probs")
        return beta * (logps - np.asarray(ref_logps, dtype=np.float64))
    raise ValueError(f"unknown implicit reward form {form!r}")


def map_score(m_ex: np.ndarray, m_im: np.ndarray, alpha: float) -> np.ndarray:
    return np.abs(m_ex) - alpha * np.abs(m_im)


def map_unregularised(m_ex: np.ndarray, m_im: np.ndarray, alpha: float) -> np.ndarray:
    return np.asarray(m_ex) - alpha * np.asarray(m_im)


@dataclass(frozen=True)
class Moments:
    """count, mean and M2 (sum of squared deviations) of one column; merges exactly across shards (Chan et
    al.), which keeps the variance accurate where sum-of-squares would cancel."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls()
        mean = float(values.mean())
        return cls(int(values.size), mean, float(((values - mean) ** 2).sum()))

    def merge(self, other: Moments) -> Moments:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return Moments(n, mean, m2)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof = 0), as the reference code uses."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")

    def zscore(self, values: np.ndarray) -> np.ndarray:
        """A constant column (std 0) z-scores to 0 rather than NaN, so it simply stops ranking."""
        values = np.asarray(values, dtype=np.float64)
        std = self.std
        if not std > 0:
            return np.zeros_like(values)
        return (values - self.mean) / std

    def to_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class PoolMoments:
    explicit: Moments  # of m_ex
    implicit_abs: Moments  # of |m_im|

    @classmethod
    def of(cls, m_ex: np.ndarray, m_im: np.ndarray) -> PoolMoments:
        return cls(Moments.of(m_ex), Moments.of(np.abs(m_im)))

    def merge(self, other: PoolMoments) -> PoolMoments:
        return PoolMoments(self.explicit.merge(other.explicit), self.implicit_abs.merge(other.implicit_abs))


def map_z(m_ex: np.ndarray, m_im: np.ndarray, alpha: float, pool: PoolMoments) -> np.ndarray:
    """Naive equivalent: zscore(m_ex) - alpha * zscore(|m_im|) with both z-scores over the whole pool."""
    return pool.explicit.zscore(m_ex) - alpha * pool.implicit_abs.zscore(np.abs(m_im))


def seeded_uniform(pair_ids: list[str], seed: int) -> np.ndarray:
    """A random score per pair that depends only on (seed, pair_id), not on how the pool is sharded."""
    import hashlib

    out = np.empty(len(pair_ids), dtype=np.float64)
    for i, pid in enumerate(pair_ids):
        h = hashlib.blake2b(f"{seed}:{pid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2.0**64
    return out


def map_forms(m_ex: np.ndarray, m_im: np.ndarray, alpha: float, pool: PoolMoments) -> dict[str, np.ndarray]:
    """The three MAP forms of a block of rows, all from the same alpha (the one place alpha reaches them)."""
    m_ex, m_im = np.asarray(m_ex, dtype=np.float64), np.asarray(m_im, dtype=np.float64)
    return {C.MAP: map_score(m_ex, m_im, alpha), C.MAP_UNREG: map_unregularised(m_ex, m_im, alpha),
            C.MAP_Z: map_z(m_ex, m_im, alpha, pool)}


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# the selection metrics computed from (m_ex, m_im) alone: the table in the module docstring
FROM_MARGINS = {
    "implicit_margin_small": lambda m_ex, m_im: -np.abs(m_im),
    "implicit_margin_large": lambda m_ex, m_im: m_im,
    "dpo_loss": lambda m_ex, m_im: np.logaddexp(0.0, -m_im),  # -log sigma(m_im), stable for large |m_im|
    "dpo_grad_weight": lambda m_ex, m_im: sigmoid(-m_im),
    "rm_confidence": lambda m_ex, m_im: sigmoid(m_ex),
    "rank_disagreement": lambda m_ex, m_im: (np.sign(m_im) != np.sign(m_ex)).astype(np.float64),
}


def selection_score(metric: str, columns: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """The value rows are ranked by (higher is kept) for each selection metric (`config.SelectionMetric`): the
    column of that name, one computed from the two margins (`FROM_MARGINS`), or a seeded random value."""
    if metric in FROM_MARGINS:
        m_ex = np.asarray(columns[C.EXPLICIT_MARGIN], dtype=np.float64)
        return FROM_MARGINS[metric](m_ex, np.asarray(columns[C.IMPLICIT_MARGIN], dtype=np.float64))
    if metric == "random":
        ids = columns[C.PAIR_ID]  # an Arrow column (the passes: converted only for this metric) or a list
        return seeded_uniform(ids.to_pylist() if hasattr(ids, "to_pylist") else list(ids), seed)
    if metric not in columns:
        raise ValueError(f"unknown selection metric {metric!r}")
    return np.asarray(columns[metric], dtype=np.float64)


def selection_count(pool_size: int, rule: str, value: float) -> int:
    """Rows kept by a ranking rule: top_k keeps min(k, n), ratio floor(ratio * n) like the reference code's
    int(len * ratio)."""
    if rule == "top_k":
        return min(int(value), pool_size)
    if rule == "ratio":
        return int(pool_size * value)
    raise ValueError(f"{rule!r} is not a ranking rule")


def top_k_mask(scores: np.ndarray, pair_ids: list[str], k: int) -> np.ndarray:
    """Naive, in-memory selection: the k highest scores, ties broken by the smaller pair_id."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], pair_ids[i]))
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:k]] = True
    return mask
