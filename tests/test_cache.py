"""Incremental rescoring: a new policy checkpoint reruns only the policy; the reference and reward models are
not even loaded on a full cache hit, and the results equal a full run without the cache."""

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mapray.cache import ScoreCache, cached_scores
from mapray.config import load_config
from mapray.manifest import identify_models
from mapray.pipeline import score
from tests.conftest import UF

COLUMNS = ["reward_chosen", "reward_rejected", "chosen_logps", "rejected_logps", "ref_chosen_logps",
           "ref_rejected_logps", "implicit_margin", "map", "map_z", "selected"]


def test_cached_scores_by_hand(tmp_path):
    cache = ScoreCache(str(tmp_path), "rewards", "float32", "abc")
    calls = []

    def score(seqs):
        calls.append(len(seqs))
        return [float(sum(s)) for s in seqs]

    assert cached_scores([[[1, 2], [3]], [[4]]], score, cache) == [[3.0, 3.0], [4.0]]
    assert cached_scores([[[1, 2], [3]], [[5, 5]]], score, cache) == [[3.0, 3.0], [10.0]]
    assert calls == [3, 1]  # the second call scored only the new row
    reloaded = ScoreCache(str(tmp_path), "rewards", "float32", "abc")
    assert reloaded.values == cache.values and len(reloaded.values) == 3
    assert ScoreCache(str(tmp_path), "rewards", "bfloat16", "abc").values == {}  # dtype is part of the key
    assert ScoreCache.key([[1, 2], [3]]) != ScoreCache.key([[1], [2, 3]])


def _new_policy(tiny, out):
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny["policy"]).save_pretrained(out)
    return str(out)


def _cfg(tmp_path, policy, tiny, name, cache):
    # keep_end: with keep_start, rows whose prompt alone fills max_length (7 of these 16) would be set aside
    model = {"max_length": 192, "truncation_mode": "keep_end", "token_budget": 2048, "batch_size": 8,
             "cpus_per_actor": 0.5}
    return load_config(None, base={
        "input": {"uri": str(tmp_path / "in.jsonl"), "columns": {"id": "prompt_id"}},
        "output": str(tmp_path / name), "cache": cache,
        "policy": {"path": policy, **model}, "reference": {"path": tiny["reference"], **model},
        "reward": {"source": "model", "model": {"path": tiny["reward"], **model}},
        "metric": {"implicit": "dpo"}, "selection": {"ratio": 0.5},
    })


def test_rescoring_a_new_policy_reuses_reference_and_rewards(tmp_path, tiny, local_ray):
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(UF.read_bytes().splitlines()[:16]) + b"\n")
    cache = str(tmp_path / "cache")
    first = _cfg(tmp_path, tiny["policy"], tiny, "v1", cache)
    score(first)
    shas = {k: v["sha256"] for k, v in identify_models(first).items()}

    def loads(kind, key):
        return ScoreCache(cache, kind, "float32", shas[key]).loads()

    assert loads("logprobs", "reference") == 1 and loads("rewards", "reward.model") == 1

    new_policy = _new_policy(tiny, tmp_path / "policy-v2")
    second = _cfg(tmp_path, new_policy, tiny, "v2", cache)
    score(second)
    assert loads("logprobs", "reference") == 1 and loads("rewards", "reward.model") == 1  # not run at all
    new_sha = identify_models(second)["policy"]["sha256"]
    assert new_sha != shas["policy"] and ScoreCache(cache, "logprobs", "float32", new_sha).loads() == 1

    score(_cfg(tmp_path, new_policy, tiny, "full", None))
    cached = {r["pair_id"]: r for r in pq.read_table(tmp_path / "v2" / "scored").to_pylist()}
    full = {r["pair_id"]: r for r in pq.read_table(tmp_path / "full" / "scored").to_pylist()}
    assert cached.keys() == full.keys() and len(full) == 16
    for pid, row in full.items():
        for col in COLUMNS:
            assert cached[pid][col] == pytest.approx(row[col], abs=1e-9), (pid, col)
    old = {r["pair_id"]: r for r in pq.read_table(tmp_path / "v1" / "scored").to_pylist()}
    assert any(old[p]["chosen_logps"] != full[p]["chosen_logps"] for p in full)  # the policy really changed
