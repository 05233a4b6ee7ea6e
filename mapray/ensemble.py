"""Several reward models made one explicit margin, and how far they agree (`reward.models`).

Per row, in the model pass, once every reward stage has scored it (`combine_rewards`): a candidates row's pair is
picked by the models' weighted mean reward; each model's margin is `reward_<name>_margin`; `reward_chosen` and
`reward_rejected` are the weighted means of the models' rewards, so the explicit margin the row metrics take from
them is the weighted mean of the raw margins (the `mean` rule); `reward_sign_disagree` says whether one model's
margin is positive and another's negative, and `reward.on_sign_disagreement: set_aside` sets such a row aside.

Over the pool, in the global pass (`Combination.pool_moments`, then `Combination.apply` on every block): each
model's margin z-scored over the pool (count, mean and M2 merged exactly, as the selection's moments), their spread
across the models (`reward_margin_spread`: population std of the z-scored margins), and the explicit margin under
the configured rule (`mean_z`: the weighted mean of the z-scored margins, so models on different scales count
alike). The per-model columns stay in scored/, so `mapray select --combine` reselects under another rule without a
model run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mapray import columns as C
from mapray.config import RewardConfig
from mapray.formats import assistant, pick_pair
from mapray.metrics import Moments
from mapray.public_rows import good
from mapray.reductions import reduce


@dataclass(frozen=True)
class Combination:
    """The reward models of a run (their column names, in order), their weights and the rule combining their
    margins into the explicit margin."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    rule: str = "mean"

    @classmethod
    def of(cls, reward: RewardConfig, rule: str | None = None) -> Combination | None:
        """A run's combination (`rule` in place of the configured one, as a reselection asks); None for a run of
        one reward model or of scores from the input."""
        if not reward.several:
            return None
        return cls(tuple(m.column_name for m in reward.models), tuple(m.weight for m in reward.models),
                   rule or reward.combine)

    def margins(self, table: pa.Table) -> np.ndarray:
        """(rows, models): each model's margin (NaN where a row has none)."""
        return np.column_stack([_numpy(table, c) for c in self.columns])

    @property
    def columns(self) -> list[str]:
        """What the pool step reads of a row besides the explicit margin."""
        return [C.reward_model_columns(n)[2] for n in self.names]

    def pool_moments(self, rows) -> list[Moments]:
        """Each model's margin moments over the pool's rows (good rows; one Ray Data pass)."""
        found = reduce(rows.select_columns([c for c in [*self.columns, C.REJECT, C.REJECT_REASON]
                                            if c in rows.schema().names]), _margin_moments, combination=self)
        return found or [Moments() for _ in self.names]

    def apply(self, table: pa.Table, moments: list[Moments]) -> pa.Table:
        """A block with the pool-level columns: the explicit margin under this rule, the models' spread."""
        margins = self.margins(table)
        z = np.column_stack([m.zscore(margins[:, j]) for j, m in enumerate(moments)])
        weights = np.asarray(self.weights, dtype=np.float64)
        combined = (z if self.rule == "mean_z" else margins) @ weights / weights.sum()
        missing = np.isnan(margins).any(axis=1)
        spread = z.std(axis=1)
        table = C.set_column(table, C.EXPLICIT_MARGIN, pa.array(combined, pa.float64(), mask=missing), pa.float64())
        return C.set_column(table, C.REWARD_MARGIN_SPREAD, pa.array(spread, pa.float64(), mask=missing), pa.float64())

    def summary(self, moments: list[Moments]) -> dict:
        """For the manifest: the rule, and each model's weight and pool moments."""
        return {"rule": self.rule, "models": {n: {"weight": w, "margin": m.to_dict()}
                                              for n, w, m in zip(self.names, self.weights, moments)}}


def combined_margins(rows, combination: Combination | None):
    """(`rows` with the explicit margin under `combination` and the models' spread, lazily, and (combination, the
    pool's moments of each model's margin)); the rows as they are and None for a run of one reward model."""
    if combination is None:
        return rows, None
    moments = combination.pool_moments(rows)
    return rows.map_batches(combination.apply, fn_kwargs={"moments": moments}, batch_format="pyarrow"), (
        combination, moments)


def _margin_moments(table: pa.Table, combination: Combination) -> list[Moments]:
    margins = combination.margins(good(table))
    return [Moments.of(column[~np.isnan(column)]) for column in margins.T]


def combine_rewards(table: pa.Table, combination: Combination, set_aside: bool) -> pa.Table:
    """The row step after every reward stage of several models (the module docstring)."""
    weights = np.asarray(combination.weights, dtype=np.float64) / sum(combination.weights)
    table = _pick_candidates(table, combination, weights)
    names = [C.reward_model_columns(n) for n in combination.names]
    chosen = np.column_stack([_numpy(table, c) for c, _, _ in names])
    rejected = np.column_stack([_numpy(table, r) for _, r, _ in names])
    margins = chosen - rejected
    missing = np.isnan(margins).any(axis=1)
    for (_, _, margin), column in zip(names, margins.T):
        table = C.set_column(table, margin, pa.array(column, pa.float64(), mask=np.isnan(column)), pa.float64())
    for name, values in ((C.REWARD_CHOSEN, chosen @ weights), (C.REWARD_REJECTED, rejected @ weights)):
        table = C.set_column(table, name, pa.array(values, pa.float64(), mask=missing), pa.float64())
    with np.errstate(invalid="ignore"):
        disagree = (margins > 0).any(axis=1) & (margins < 0).any(axis=1)
    table = C.set_column(table, C.REWARD_SIGN_DISAGREE, pa.array(disagree, pa.bool_(), mask=missing), pa.bool_())
    if not set_aside:
        return table
    reasons = {int(i): "reward models disagree in sign: " + ", ".join(
        f"{n} {m:+.4g}" for n, m in zip(combination.names, margins[i])) for i in np.flatnonzero(disagree)}
    return C.mark_rejected(table, reasons, "reward")


def _pick_candidates(table: pa.Table, combination: Combination, weights: np.ndarray) -> pa.Table:
    """Candidates rows: the pair picked by the models' weighted mean reward, each model's rewards of that pair
    (and its label scores, for a multi-label head), the mean rewards as the row's candidate rewards."""
    from mapray.stages import candidate_rewards_column

    candidates = table.column(C.CANDIDATES).to_pylist()
    rows = [i for i in C.good_rows(table) if candidates[i] is not None]
    if not rows:
        return table
    per_model = {n: table.column(candidate_rewards_column(n)).to_pylist() for n in combination.names}
    columns = {name: table.column(name).to_pylist() for n in combination.names
               for name in _pair_columns(table, n)}
    chosen, rejected = table.column(C.CHOSEN).to_pylist(), table.column(C.REJECTED).to_pylist()
    mean_rewards = table.column(C.CANDIDATE_REWARDS).to_pylist()
    for i in rows:
        if any(per_model[n][i] is None for n in combination.names):
            continue  # a model set the row aside or has no value for it
        texts = json.loads(candidates[i])
        mean = [None if per_model[combination.names[0]][i][k] is None
                else float(np.dot(weights, [per_model[n][i][k] for n in combination.names]))
                for k in range(len(texts))]
        best, worst = pick_pair(texts, mean)
        chosen[i], rejected[i] = (json.dumps(assistant(texts[k]), ensure_ascii=False) for k in (best, worst))
        mean_rewards[i] = mean
        for n in combination.names:
            reward_c, reward_r, _ = C.reward_model_columns(n)
            columns[reward_c][i], columns[reward_r][i] = per_model[n][i][best], per_model[n][i][worst]
            labels = candidate_rewards_column(n) + C.LABELS_SUFFIX
            if labels in table.column_names:
                scores = table.column(labels)[i].as_py()
                columns[reward_c + C.LABELS_SUFFIX][i] = scores[best]
                columns[reward_r + C.LABELS_SUFFIX][i] = scores[worst]
    for name, values in ((C.CHOSEN, chosen), (C.REJECTED, rejected), (C.CANDIDATE_REWARDS, mean_rewards)):
        table = C.set_column(table, name, values, C.INTERNAL_TYPES[name])
    for name, values in columns.items():
        table = C.set_column(table, name, values, table.schema.field(name).type)
    return table


def _pair_columns(table: pa.Table, name: str) -> list[str]:
    reward_c, reward_r, _ = C.reward_model_columns(name)
    return [c for c in (reward_c, reward_r, reward_c + C.LABELS_SUFFIX, reward_r + C.LABELS_SUFFIX)
            if c in table.column_names]


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
