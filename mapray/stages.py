"""Ray Data stages: callable classes mapped over actor pools, each loading its model once per actor.

Every stage takes and returns pyarrow batches, adds its columns to the same rows (no joins), leaves rows that
an earlier step rejected untouched (nulls in its columns), and rejects a row it cannot score by setting
`_m_reject` with the reason, never by raising.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from mapray import columns as C
from mapray import metrics
from mapray.cache import Namespace, cached_values, row_keys, with_values
from mapray.config import MetricConfig, ModelConfig
from mapray.formats import RejectRow, assistant, distinct_candidates, pick_pair

log = logging.getLogger(__name__)


def load_encoder(cfg: ModelConfig):
    """Resolves the model's files on this node and builds its tokenizer + chat-template encoder."""
    from transformers import AutoTokenizer

    from mapray.models import resolve_model_path
    from mapray.templates import PairEncoder

    if cfg.device != "cuda" and cfg.engine == "torch":  # vLLM's CPU backend binds its own OpenMP threads
        import torch

        torch.set_num_threads(max(1, math.ceil(cfg.cpus_per_actor)))
    local = resolve_model_path(cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(local)
    return PairEncoder(tokenizer, cfg.max_length, cfg.truncation_mode, cfg.chat_template,
                       cfg.split_special_tokens), local


class _ModelStage:
    """Loads the tokenizer at once and the model only when a row needs it: when every row of a block has a
    cached value (`mapray.cache`), the model is never loaded at all. `cached_only`: the run's cache lookup found a
    value for every row of the pool (or no row reaches the model pass), so nothing is loaded, not even the
    tokenizer, and the stage runs in light tasks instead of an actor pool (`from_cache`)."""

    KIND = ""

    def __init__(self, cfg: ModelConfig, cache: Namespace | None = None, pick: str | None = None,
                 cached_only: bool = False):
        self.cfg = cfg
        self.cache, self.pick = cache, pick
        self.encoder, self.local = (None, None) if cached_only else load_encoder(cfg)
        self._engine = None
        if cache is None and not cached_only:
            _ = self.engine  # no cache: load at actor start, so a model that cannot load fails the job early

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self._load_engine()
            if self.cache is not None:
                self.cache.record_load()
        return self._engine

    def _cached(self, table: pa.Table) -> tuple[list, list]:
        """The values the cache lookup attached to the rows, and each row's key (to store what is computed)."""
        if self.cache is None:
            values, keys = [None] * table.num_rows, [None] * table.num_rows
        else:
            values, keys = cached_values(table, self.cache), row_keys(table, self.cache, self.pick)
        if self.encoder is None and any(values[i] is None for i in C.good_rows(table)):
            role = self.cache.role if self.cache is not None else self.cfg.path
            raise RuntimeError(f"{role}: a row without a cached value reached the stage that loads no model (the "
                               "run counted a value for every row, or no row to score)")
        return values, keys


class LogprobStage(_ModelStage):
    """Policy or reference log-probs of the chosen and rejected responses.

    In: `_m_prompt`, `_m_chosen`, `_m_rejected`, `_m_reject`.
    Out (policy): `chosen_logps`, `rejected_logps`, `chosen_tokens`, `rejected_tokens`, `chosen_truncated`,
    `rejected_truncated`. Out (reference): `ref_chosen_logps`, `ref_rejected_logps`. A row's cached value holds
    all six, in that order (`VALUE`).
    """

    INPUTS = [C.PROMPT, C.CHOSEN, C.REJECTED, C.REJECT]
    KIND = "logprobs"
    VALUE = (C.CHOSEN_LOGPS, C.REJECTED_LOGPS, C.CHOSEN_TOKENS, C.REJECTED_TOKENS, C.CHOSEN_TRUNCATED,
             C.REJECTED_TRUNCATED)

    def __init__(self, cfg: ModelConfig, role: str = "policy", cache: Namespace | None = None,
                 pick: str | None = None, cached_only: bool = False):
        self.role = role  # before the model loads: its checks name the role
        self.prefix = "ref_" if role == "reference" else ""
        super().__init__(cfg, cache, pick, cached_only)

    def _load_engine(self):
        from mapray.scoring import load_logprob_engine

        return load_logprob_engine(self.cfg, self.local, self.role)

    def __call__(self, table: pa.Table) -> pa.Table:
        C.require(table, self.INPUTS, f"{self.role} log-probs")
        prompts, chosen, rejected = (table.column(c).to_pylist() for c in (C.PROMPT, C.CHOSEN, C.REJECTED))
        values, keys = self._cached(table)
        new_keys: list[str | None] = [None] * table.num_rows
        todo, encoded, reasons = [], [], {}
        for i in C.good_rows(table):
            if values[i] is not None:
                continue
            try:
                pair = self.encoder.encode_pair(*(json.loads(column[i]) for column in (prompts, chosen, rejected)))
            except RejectRow as e:
                reasons[i] = str(e)
                continue
            todo.append(i)
            encoded.append(pair)
        if encoded:
            sums = self.engine.logprobs([seq for pair in encoded for seq in pair.sequences()])
            for k, (i, pair) in enumerate(zip(todo, encoded)):
                values[i] = [sums[2 * k], sums[2 * k + 1], len(pair.chosen[1]), len(pair.rejected[1]),
                             float(pair.chosen_truncated), float(pair.rejected_truncated)]
                new_keys[i] = keys[i]
        names = self.VALUE if not self.prefix else self.VALUE[:2]
        for j, name in enumerate(names):
            column = [None if v is None else v[j] for v in values]
            if name.endswith("truncated"):
                column = [None if v is None else bool(v) for v in column]
            elif name.endswith("tokens"):
                column = [None if v is None else int(v) for v in column]
            table = C.set_column(table, f"{self.prefix}{name}", column, C.SCORED[name])
        table = with_values(table, self.cache, values, new_keys)
        return C.mark_rejected(table, reasons, self.role)


class RewardStage(_ModelStage):
    """Explicit rewards from one reward model: the raw logit of a single-label sequence classifier (or a
    multi-objective head's label scores reduced by `label_weights`), on the prompt and response through the
    reward model's own chat template.

    In: `_m_prompt`, `_m_chosen`, `_m_rejected`, `_m_candidates`, `_m_candidate_rewards`, `_m_reject`.
    Out, the run's one reward model (`name` None): `reward_chosen`, `reward_rejected`; for N-candidates rows every
    candidate is scored (as an assistant turn), `_m_candidate_rewards` holds the rewards aligned with the
    candidates, and `_m_chosen` / `_m_rejected` are set to the argmax / argmin (ties: `mapray.formats.pick_pair`).
    Out, one of several models (`name`): `reward_<name>_chosen`, `reward_<name>_rejected` on pair rows, the
    candidates' rewards in `_m_candidate_rewards_<name>`: the pair is picked once every model has scored
    (`mapray.ensemble.combine_rewards`). A multi-label head also writes each side's label scores
    (`..._chosen_labels`, `..._rejected_labels`). A row's cached value holds the label scores of the sequences it
    scores, sequence after sequence: chosen and rejected, or every candidate taking part.
    """

    INPUTS = [C.PROMPT, C.CHOSEN, C.REJECTED, C.CANDIDATES, C.CANDIDATE_REWARDS, C.REJECT]
    KIND = "rewards"

    def __init__(self, cfg: ModelConfig, cache: Namespace | None = None, pick: str | None = None,
                 name: str | None = None, cached_only: bool = False):
        self.name = name
        self.label_weights = getattr(cfg, "label_weights", None)
        self.labels = len(self.label_weights) if self.label_weights else 1
        super().__init__(cfg, cache, pick, cached_only)

    def _load_engine(self):
        from mapray.scoring import load_reward_engine

        return load_reward_engine(self.cfg, self.local)

    def _reward(self, scores: list[float]) -> float:
        if self.label_weights is None:
            return scores[0]
        return float(np.dot(self.label_weights, scores))

    def __call__(self, table: pa.Table) -> pa.Table:
        C.require(table, self.INPUTS, "rewards")
        prompts = table.column(C.PROMPT).to_pylist()
        chosen, rejected = table.column(C.CHOSEN).to_pylist(), table.column(C.REJECTED).to_pylist()
        candidates = table.column(C.CANDIDATES).to_pylist()
        values, keys = self._cached(table)
        new_keys: list[str | None] = [None] * table.num_rows
        groups, owners, reasons = [], {}, {}
        for i in C.good_rows(table):
            if candidates[i] is None:
                completions = [json.loads(chosen[i]), json.loads(rejected[i])]
            else:  # every candidate that takes part in picking the pair (not empty, not a duplicate)
                texts = json.loads(candidates[i])
                owners[i] = (texts, distinct_candidates(texts))
                completions = [assistant(texts[k]) for k in owners[i][1]]
            if values[i] is not None:
                continue
            prompt = json.loads(prompts[i])
            try:
                groups.append((i, [self.encoder.encode_full(prompt, c)[0] for c in completions]))
            except RejectRow as e:
                reasons[i] = str(e)
        if groups:
            flat = iter(self.engine.label_scores([seq for _, group in groups for seq in group]))
            for i, group in groups:
                values[i], new_keys[i] = [v for _ in group for v in next(flat)], keys[i]
        out = {side: [None] * table.num_rows for side in ("chosen", "rejected")}
        labels = {side: [None] * table.num_rows for side in ("chosen", "rejected")}
        # the one reward model keeps what an earlier step left there on rows it does not score
        candidate_rewards = (table.column(C.CANDIDATE_REWARDS).to_pylist() if self.name is None
                             else [None] * table.num_rows)
        candidate_labels = [None] * table.num_rows
        for i in C.good_rows(table):
            if values[i] is None:
                continue
            scores = [values[i][j:j + self.labels] for j in range(0, len(values[i]), self.labels)]
            if i not in owners:
                for side, s in zip(("chosen", "rejected"), scores):
                    out[side][i], labels[side][i] = self._reward(s), s
                continue
            texts, scored = owners[i]
            candidate_rewards[i], candidate_labels[i] = [None] * len(texts), [None] * len(texts)
            for k, s in zip(scored, scores):
                candidate_rewards[i][k], candidate_labels[i][k] = self._reward(s), s
            if self.name is None:  # the run's one reward model picks the pair
                best, worst = pick_pair(texts, candidate_rewards[i])
                chosen[i], rejected[i] = (json.dumps(assistant(texts[k]), ensure_ascii=False) for k in (best, worst))
                for side, k in (("chosen", best), ("rejected", worst)):
                    out[side][i], labels[side][i] = candidate_rewards[i][k], candidate_labels[i][k]
        table = self._write(table, out, labels, candidate_rewards, candidate_labels, chosen, rejected)
        table = with_values(table, self.cache, values, new_keys)
        return C.mark_rejected(table, reasons, "reward")

    def _write(self, table, out, labels, candidate_rewards, candidate_labels, chosen, rejected) -> pa.Table:
        reward_c, reward_r, _ = C.reward_model_columns(self.name)
        columns = [(reward_c, out["chosen"], pa.float64()), (reward_r, out["rejected"], pa.float64())]
        if self.labels > 1:
            columns += [(name + C.LABELS_SUFFIX, labels[side], pa.list_(pa.float64()))
                        for name, side in ((reward_c, "chosen"), (reward_r, "rejected"))]
        if self.name is None:
            columns += [(C.CHOSEN, chosen, pa.string()), (C.REJECTED, rejected, pa.string()),
                        (C.CANDIDATE_REWARDS, candidate_rewards, pa.list_(pa.float64()))]
        else:
            columns.append((candidate_rewards_column(self.name), candidate_rewards, pa.list_(pa.float64())))
            if self.labels > 1:
                columns.append((candidate_rewards_column(self.name) + C.LABELS_SUFFIX, candidate_labels,
                                pa.list_(pa.list_(pa.float64()))))
        for name, values, type_ in columns:
            table = C.set_column(table, name, values, type_)
        return table


@dataclass(frozen=True)
class Step:
    """One step of the model pass: a model stage (`model` set: `fn` is its class, built once per actor with
    `cfg=model` and `kwargs`) or a light function of a batch (`fn(table, **kwargs)`)."""

    fn: Callable
    kwargs: dict
    model: ModelConfig | None = None


class ModelChain:
    """Every step of the model pass in one actor (`RunConfig.colocate_models`): each model stage built once here,
    the light steps between them called in order, on each batch. One process imports torch and transformers
    and holds one runtime for all the models, where a pool per model pays that per model."""

    def __init__(self, steps: list[Step], cpus: float):
        self.steps = [step.fn(cfg=step.model, **step.kwargs) if step.model is not None
                      else partial(step.fn, **step.kwargs) for step in steps]
        if all(step.model.device != "cuda" for step in steps if step.model is not None):
            import torch

            # each stage set the threads of its own share of the actor's CPUs; the stages run one at a time here
            torch.set_num_threads(max(1, math.ceil(cpus)))

    def __call__(self, table: pa.Table) -> pa.Table:
        for step in self.steps:
            table = step(table)
        return table


def from_cache(table: pa.Table, stage_cls: type, kwargs: dict) -> pa.Table:
    """A model stage's columns for a block whose every row has its cached value or is set aside: the stage's own
    code, with nothing loaded (a light task's function; cheap enough to build per block)."""
    return stage_cls(**kwargs, cached_only=True)(table)


def reward_role(name: str | None) -> str:
    """A reward model's role: its cache namespace's name (`mapray.pipeline.cache_namespaces`)."""
    return "reward" if name is None else f"reward_{name}"


def candidate_rewards_column(name: str) -> str:
    """Where one of several reward models keeps a candidates row's rewards until the pair is picked."""
    return f"{C.CANDIDATE_REWARDS}_{name}"


def policy_from_generation(table: pa.Table) -> pa.Table:
    """The policy columns from self-play's generation pass (`generation.reuse_logps`), in place of a scoring pass:
    the picked pair's raw log-prob sums and token counts as vLLM returned them with the samples (the reference
    code's implicit reward). A sample that ran out of max_tokens counts as truncated. These are the log-probs of
    the sampled tokens, without the chat template's end-of-turn that TRL's tokenization adds (README "Self-play").

    In: `_m_candidates`, `_m_candidate_rewards` (the reward stage's), `generation_logps`, `generation_tokens`,
    `finish_reasons`. Out: the policy columns of `LogprobStage`."""
    C.require(table, [C.CANDIDATES, C.CANDIDATE_REWARDS, C.REJECT, "generation_logps", "generation_tokens",
                      "finish_reasons"], "policy log-probs from the generation")
    candidates, rewards = table.column(C.CANDIDATES).to_pylist(), table.column(C.CANDIDATE_REWARDS).to_pylist()
    logps, tokens, finish = (table.column(c).to_pylist() for c in ("generation_logps", "generation_tokens",
                                                                    "finish_reasons"))
    values = {name: [None] * table.num_rows for name in LogprobStage.VALUE}
    for i in C.good_rows(table):
        picked = pick_pair(json.loads(candidates[i]), rewards[i])
        for side, k in zip(("chosen", "rejected"), picked):
            values[f"{side}_logps"][i] = logps[i][k]
            values[f"{side}_tokens"][i] = tokens[i][k]
            values[f"{side}_truncated"][i] = finish[i][k] == "length"
    for name, column in values.items():
        table = C.set_column(table, name, column, C.SCORED[name])
    return table


def add_row_metrics(table: pa.Table, metric: MetricConfig, rewards_from_columns: bool) -> pa.Table:
    """Per-row margins and implicit rewards. The MAP forms are not computed here: they depend on alpha, which
    reaches them only in the global pass (selection.add_scores), so a reselection with another alpha is right."""
    if rewards_from_columns:
        table = C.set_column(table, C.REWARD_CHOSEN, table.column(C.SCORE_CHOSEN), pa.float64())
        table = C.set_column(table, C.REWARD_REJECTED, table.column(C.SCORE_REJECTED), pa.float64())
    for name in (C.REF_CHOSEN_LOGPS, C.REF_REJECTED_LOGPS):
        if name not in table.column_names:
            table = C.set_column(table, name, pa.nulls(table.num_rows, pa.float64()), pa.float64())

    def num(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    good = np.array([r is None for r in table.column(C.REJECT).to_pylist()], dtype=bool)
    beta, form = metric.resolved_beta, metric.implicit
    ref_c = num(C.REF_CHOSEN_LOGPS) if form == "dpo" else None
    ref_r = num(C.REF_REJECTED_LOGPS) if form == "dpo" else None
    with np.errstate(all="ignore"):  # rejected rows hold nulls (NaN here) and are masked below
        m_ex = metrics.explicit_margin(num(C.REWARD_CHOSEN), num(C.REWARD_REJECTED))
        r_c = metrics.implicit_reward(form, beta, num(C.CHOSEN_LOGPS), num(C.CHOSEN_TOKENS), ref_c)
        r_r = metrics.implicit_reward(form, beta, num(C.REJECTED_LOGPS), num(C.REJECTED_TOKENS), ref_r)
        m_im = r_c - r_r
        values = {C.EXPLICIT_MARGIN: m_ex, C.IMPLICIT_REWARD_CHOSEN: r_c, C.IMPLICIT_REWARD_REJECTED: r_r,
                  C.IMPLICIT_MARGIN: m_im}
    for name, array in values.items():
        table = C.set_column(table, name, pa.array(array, pa.float64(), mask=~good), pa.float64())
    return table
