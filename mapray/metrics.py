"""Margins, implicit rewards, MAP and pool moments: pure numpy, no Ray.

Definitions follow ../shared/PAPER.md (Huang et al., ICML 2025) and the reference code's conventions:
- explicit margin  m_ex = r(x, y_w) - r(x, y_l)
- implicit reward  simpo: (beta / |y|) * log pi(y|x);  dpo: beta * (log pi(y|x) - log pi_ref(y|x))
- implicit margin  m_im = r_hat(x, y_w) - r_hat(x, y_l)
- map       = |m_ex| - alpha * |m_im|         (paper form, per row)
- map_unreg = m_ex - alpha * m_im             (no noise regulariser)
- map_z     = z(m_ex) - alpha * z(|m_im|)      (reference-code form; z over the whole pool, population std)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def selection_score(metric: str, columns: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """The value rows are ranked by (higher is kept) for each selection metric."""
    if metric in ("map_z", "map", "map_unreg", "explicit_margin"):
        return np.asarray(columns[metric], dtype=np.float64)
    if metric == "implicit_margin_small":
        return -np.abs(np.asarray(columns["implicit_margin"], dtype=np.float64))
    if metric == "random":
        return seeded_uniform(list(columns["pair_id"]), seed)
    raise ValueError(f"unknown selection metric {metric!r}")


def selection_count(pool_size: int, ratio: float | None, top_k: int | None) -> int:
    if top_k is not None:
        return min(top_k, pool_size)
    return int(pool_size * ratio)  # floor, like the reference code's int(len * ratio)


def top_k_mask(scores: np.ndarray, pair_ids: list[str], k: int) -> np.ndarray:
    """Naive, in-memory selection: the k highest scores, ties broken by the smaller pair_id."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], pair_ids[i]))
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:k]] = True
    return mask
