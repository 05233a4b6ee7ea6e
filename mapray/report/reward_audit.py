"""The reward-bias audit: how far the selection moves when a known bias is added to the rewards, and how far
several reward models agree. The MAP paper's own first check of its main limitation (MAP is only as good as the
reward model): corrupt the reward with a known bias and see whether the selection follows it.

Biases, each a per-pair difference d = feature(chosen) - feature(rejected) added to the margin as m + lambda * d
(a reward r + lambda * feature shifts the margin by exactly that):
- `length`: response tokens (the verbosity bias of reward models: Singhal et al., arXiv 2310.03716);
- `format`: markdown elements in the response, list items, headers and bold spans (the format bias of reward
  models: Zhang et al., "From Lists to Emojis", arXiv 2409.11704).
lambda is given as a fraction f of the margin's spread per unit of the feature's (lambda = f * std(m) / std(d)),
so the sweep means the same for every reward scale.

Margins audited: the run's explicit margin and, in a run of several reward models, each model's alone (for the
combination, the bias is added to the combined margin, as every model's reward carrying it would shift it under
the `mean` rule). Each (margin, bias, f, metric) is a report variant at the run's alpha and size, for the run's
metric and every other metric that reads the explicit margin (`READ_EXPLICIT`: the rest cannot move), compared
with the same metric's selection without the bias and with the run's selection. The biased pool's moments follow
exactly from one pass's means and covariance of (margins, features), so map_z needs no extra pass. Agreement of
several models: the correlation of their margins, the share of pairs whose margins have opposite signs, and the
Jaccard of the selections each model alone makes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mapray import columns as C
from mapray import metrics

BIASES = {"length": "response tokens (verbosity bias, arXiv 2310.03716)",
          "format": "markdown list items, headers and bold spans (format bias, arXiv 2409.11704)"}
FEATURES = {"length": "_r_bias_length", "format": "_r_bias_format"}  # per-row differences the report adds
RUN_MARGIN = C.EXPLICIT_MARGIN
_MARKDOWN = re.compile(r"^\s{0,3}(?:[-*+]\s|\d+[.)]\s|#{1,6}\s)|\*\*[^*\n]+\*\*", re.MULTILINE)


# the selection metrics that read the explicit margin (`mapray.metrics`): the only ones a reward bias can move
READ_EXPLICIT = ("map_z", "map", "map_unreg", "explicit_margin", "rm_confidence", "rank_disagreement")


def metrics_read_by_bias(run_metric: str) -> list[str]:
    """The metrics each audited margin is ranked by: the run's first, then every other that reads the margin."""
    return list(dict.fromkeys([run_metric, *READ_EXPLICIT]))


def model_margins(names: list[str]) -> list[str]:
    """The margins audited: the run's explicit margin, then each reward model's (several models) in scored/."""
    return [RUN_MARGIN] + [n for n in names if n.startswith("reward_") and n.endswith("_margin")
                           and C.is_reward_extra(n)]


def add_features(table: pa.Table) -> pa.Table:
    """The per-row bias differences (response tokens, markdown elements: chosen minus rejected), in place of the
    responses' texts. Rows without texts (not a mapray output's) count no markdown: that bias is then skipped."""
    length = (table.column(C.CHOSEN_TOKENS).to_numpy(zero_copy_only=False).astype(np.float64)
              - table.column(C.REJECTED_TOKENS).to_numpy(zero_copy_only=False).astype(np.float64))
    counts = [np.array([_markdown_elements(v) for v in table.column(side).to_pylist()], dtype=np.float64)
              if side in table.column_names else np.zeros(table.num_rows) for side in ("chosen", "rejected")]
    table = table.drop_columns([c for c in ("chosen", "rejected") if c in table.column_names])
    return (table.append_column(FEATURES["length"], pa.array(length))
            .append_column(FEATURES["format"], pa.array(counts[0] - counts[1])))


def _markdown_elements(completion) -> int:
    """Markdown elements in a completion: a string, or messages (TRL's conversational form)."""
    if completion is None:
        return 0
    text = completion if isinstance(completion, str) else "\n".join(m.get("content") or "" for m in completion)
    return len(_MARKDOWN.findall(text))


@dataclass(frozen=True)
class Bias:
    """One audited variant's change to the explicit margin: margin column + lambda * feature."""

    margin: str  # RUN_MARGIN or a model's reward_<name>_margin
    kind: str | None  # a key of BIASES; None: the margin as it is (a model's own selection)
    fraction: float
    lam: float

    def apply(self, cols: dict[str, np.ndarray]) -> np.ndarray:
        m = cols[self.margin]
        return m if self.kind is None else m + self.lam * cols[FEATURES[self.kind]]


def moments_pass(cols: dict[str, np.ndarray], margins: list[str]) -> dict:
    """A block's share of the audit's one pass: count, sums and cross products of (margins, features), and per
    pair of margins the rows whose signs are opposite."""
    v = np.column_stack([cols[m] for m in margins] + [cols[f] for f in FEATURES.values()])
    signs = np.sign(v[:, :len(margins)])
    return {"n": np.array([len(v)], dtype=np.float64), "sum": v.sum(axis=0), "cross": v.T @ v,
            "opposite": ((signs[:, :, None] * signs[:, None, :]) < 0).sum(axis=0).astype(np.float64)}


def plan(stats: dict, margins: list[str], fractions: tuple[float, ...]) -> list[Bias]:
    """Every audited variant: each margin under each bias and fraction, and each model's margin alone. A bias
    whose difference does not vary over the pool (`skipped`) would move nothing and is left out."""
    _, cov = _mean_cov(stats)
    out = []
    for i, margin in enumerate(margins):
        if margin != RUN_MARGIN:
            out.append(Bias(margin, None, 0.0, 0.0))
        for kind, feature in enumerate(FEATURES):
            j = len(margins) + kind
            if cov[j, j] > 0:
                out += [Bias(margin, feature, f, float(f * np.sqrt(cov[i, i] / cov[j, j]))) for f in fractions]
    return out


def skipped(stats: dict, margins: list[str]) -> list[str]:
    """The biases left out: their difference is the same for every pair of the pool."""
    _, cov = _mean_cov(stats)
    return [kind for k, kind in enumerate(FEATURES) if not cov[len(margins) + k, len(margins) + k] > 0]


def pool(bias: Bias, stats: dict, margins: list[str], implicit_abs: metrics.Moments) -> metrics.PoolMoments:
    """The pool moments of a biased margin, exactly from the pass's means and covariance."""
    mean, cov = _mean_cov(stats)
    n = int(stats["n"][0])
    i = margins.index(bias.margin)
    j = len(margins) + list(FEATURES).index(bias.kind) if bias.kind else i
    lam = bias.lam if bias.kind else 0.0
    m = mean[i] + lam * mean[j]
    var = cov[i, i] + lam * lam * cov[j, j] + 2 * lam * cov[i, j]
    return metrics.PoolMoments(metrics.Moments(n, float(m), float(max(var, 0.0) * n)), implicit_abs)


def _mean_cov(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    n = stats["n"][0]
    mean = stats["sum"] / n
    return mean, stats["cross"] / n - np.outer(mean, mean)


def numbers(stats: dict, margins: list[str], biases: list[Bias], rows: list[dict], jaccard: np.ndarray,
            own: list[int]) -> dict:
    """report.json's `reward_audit`: a row per audited variant (`rows`: its metric, selected, Jaccard with the
    run's selection and with the metric's own without the bias), and the models' agreement (`jaccard`: between the
    selections each model makes alone under the run's metric, variant indices `own`)."""
    _, cov = _mean_cov(stats)
    k = len(margins)
    std = np.sqrt(np.clip(np.diag(cov)[:k], 0, None))
    with np.errstate(all="ignore"):
        corr = cov[:k, :k] / np.outer(std, std)
    names = [_name(m) for m in margins]
    out = {"biases": BIASES, "margins": names, "skipped_biases": skipped(stats, margins),
           "rows": [{"margin": _name(b.margin), "bias": b.kind or "none", "fraction": b.fraction, "lambda": b.lam,
                     **row} for b, row in zip(biases, rows)]}
    if k > 1:
        models = list(range(1, k))
        out["agreement"] = {"models": names[1:], "correlation": corr[np.ix_(models, models)],
                            "opposite_sign_share": stats["opposite"][np.ix_(models, models)] / stats["n"][0],
                            "selection_jaccard": jaccard[np.ix_(own, own)]}
    return out


def _name(margin: str) -> str:
    """A margin as the audit names it: `explicit_margin` (the run's), or the reward model's name."""
    return margin if margin == RUN_MARGIN else margin.removeprefix("reward_").removesuffix("_margin")
