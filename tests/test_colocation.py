"""`colocate_models`: when a run's models share one actor pool, and what a config that asks for it wrongly gets.
That a shared pool gives every value a pool per model gives: tests/test_s3.py compares the runs on s3 (shared, the
default on CPUs) with a local run of the same config with a pool per model; tests/test_cluster.py compares its
cluster runs (a pool per model, on fake GPUs) with a shared-pool clean run."""

import pytest

from mapray.config import ConfigError, colocates_models, load_config
from tests.conftest import dpo_config, model_config

TINY = {"policy": "p", "reference": "r", "reward": "w"}


def _config(**changes) -> dict:
    cfg = dpo_config(TINY, "in.jsonl", "out")
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if section == "reward":
            cfg["reward"]["model"][field] = value
        elif field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


@pytest.mark.parametrize(("changes", "shared"), [
    ({}, True),  # three torch models on CPUs: one pool
    ({"reward.gpus_per_actor": 1}, False),  # a GPU asked: each model its own actor (and device)
    ({"policy.engine": "vllm"}, False),  # vLLM binds the process's threads for itself
    ({"reference.actors": 2}, False),  # pools sized apart by the user stay apart
    ({"colocate_models": False}, False),
    ({"reward.gpus_per_actor": 1, "colocate_models": True}, True),  # asked: the GPU asks add up
])
def test_models_share_a_pool_by_default_only_where_nothing_is_lost(changes, shared):
    assert colocates_models(load_config(None, base=_config(**changes))) is shared


def test_one_model_keeps_its_own_pool():
    cfg = {"input": {"uri": "in.jsonl"}, "output": "out", "policy": model_config("p")}
    assert colocates_models(load_config(None, base=cfg)) is False


@pytest.mark.parametrize(("changes", "message"), [
    ({"policy.engine": "vllm"}, "colocate_models: policy.engine is vllm: only torch-engine models share an actor"),
    ({"reference.actors": 2}, "colocate_models: the models ask different numbers of actors (policy.actors=1, "
                              "reference.actors=2, reward.model.actors=1)"),
])
def test_colocation_asked_where_it_cannot_be_stops_with_one_line(changes, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, base=_config(colocate_models=True, **changes))
    assert str(caught.value) == message


def test_the_suites_dpo_run_ran_its_three_models_in_one_pool(dpo_run):
    assert dpo_run.manifest["models_colocated"] is True
    assert dpo_run.manifest["config"]["colocate_models"] is None  # the default decided it
