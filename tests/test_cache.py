"""Incremental rescoring: a new policy checkpoint reruns only the policy; on a full cache hit a model is not
loaded and its stage starts no actor, and the values from the cache equal those the models computed."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapray import columns as C
from mapray.cache import namespace, row_keys
from mapray.cli import main
from mapray.config import ModelConfig, load_config
from mapray.manifest import identify_models
from mapray.pipeline import cache_namespaces, score
from mapray.testing.tiny_models import perturbed_copy
from tests.conftest import N_GOOD, UF, dpo_config, dpo_input_lines

COLUMNS = ["reward_chosen", "reward_rejected", "chosen_logps", "rejected_logps", "ref_chosen_logps",
           "ref_rejected_logps", "implicit_margin", "map", "map_z", "selected"]


def _rows(**columns) -> pa.Table:
    n = len(columns[C.PROMPT])
    base = {C.ROW: [str(i) for i in range(n)], C.CHOSEN: [None] * n, C.REJECTED: [None] * n,
            C.CANDIDATES: [None] * n, C.REJECT: [None] * n}
    return pa.table({**base, **columns})


def test_row_keys_say_what_decides_a_value():
    ns = namespace("/c", "policy", "logprobs", ModelConfig(path="p"), "sha1")
    pairs = _rows(**{C.PROMPT: ['"ab"', '"a"', '"ab"', '"ab"'], C.CHOSEN: ['"c"', '"bc"', '"c"', '"c"'],
                     C.REJECTED: ['"d"', '"d"', '"d"', '"d"'], C.REJECT: [None, None, None, "too long"]})
    keys = row_keys(pairs, ns, None)
    assert keys[0] == keys[2] and keys[0] != keys[1] and keys[3] is None  # texts, length-prefixed; rejected: none
    # another model, dtype, engine, or encoding setting is another namespace
    for other in (namespace("/c", "policy", "logprobs", ModelConfig(path="p"), "sha2"),
                  namespace("/c", "policy", "logprobs", ModelConfig(path="p", dtype="bfloat16"), "sha1"),
                  namespace("/c", "policy", "logprobs", ModelConfig(path="p", max_length=99), "sha1"),
                  namespace("/c", "policy", "logprobs", ModelConfig(path="p", engine="vllm"), "sha1"),
                  namespace("/c", "policy", "logprobs", ModelConfig(path="p", chat_template="{{x}}"), "sha1")):
        assert other.id != ns.id and row_keys(pairs, other, None)[0] != keys[0]
    # a candidates row's pair is picked by a reward model: keyed by every candidate and that model
    cands = _rows(**{C.PROMPT: ['"p"', '"p"'], C.CANDIDATES: ['["x", "y"]', '["x", "z"]']})
    by_a, by_b = row_keys(cands, ns, "reward-a"), row_keys(cands, ns, "reward-b")
    assert len(set(by_a + by_b)) == 4
    reward = namespace("/c", "reward", "rewards", ModelConfig(path="r"), "sha3")
    assert row_keys(cands, reward, None)[0] != row_keys(cands, reward, None)[1]


def test_a_stage_run_from_the_cache_alone_loads_nothing_and_refuses_a_row_without_a_value():
    """What a run does for a model whose every row the lookup found (`from_cache_alone`): the stage's own code in
    a light task, no tokenizer or model (the path `p` does not exist), as for a pool whose every row was set aside
    before the model pass. A row without a value reaching it would be a count gone wrong: it stops there rather
    than score nothing."""
    from mapray.stages import LogprobStage, from_cache

    ns = namespace("/c", "reference", "logprobs", ModelConfig(path="p"), "sha1")
    value = [-1.5, -2.5, 3.0, 4.0, 0.0, 1.0]
    table = _rows(**{C.PROMPT: ['"a"', '"b"', '"c"'], C.CHOSEN: ['"x"', '"x"', '"x"'],
                     C.REJECTED: ['"y"', '"y"', '"y"'], C.REJECT: [None, "set aside before", None],
                     ns.value_column: [value, None, None]})
    kwargs = {"cfg": ModelConfig(path="p"), "role": "reference", "cache": ns, "pick": None}
    out = from_cache(table.slice(0, 2), LogprobStage, kwargs)  # a set-aside row needs no value
    assert out.column("ref_chosen_logps").to_pylist() == [-1.5, None]
    assert out.column("ref_rejected_logps").to_pylist() == [-2.5, None]
    with pytest.raises(RuntimeError, match="^reference: a row without a cached value reached the stage"):
        from_cache(table, LogprobStage, kwargs)
    # no cache, no row to score (every row set aside before the model pass): the same light task
    uncached = dict(kwargs, cache=None)
    assert from_cache(table.slice(1, 1), LogprobStage, uncached).column("ref_chosen_logps").to_pylist() == [None]
    with pytest.raises(RuntimeError, match="^p: a row without a cached value reached the stage that loads no model"):
        from_cache(table, LogprobStage, uncached)


def test_a_reward_stage_run_from_the_cache_alone_picks_a_candidates_rows_pair():
    """A self-play or N-candidates row whose candidates' rewards are all cached: the stage picks the pair from the
    stored rewards as the loaded model would (argmax / argmin, `mapray.formats.pick_pair`)."""
    from mapray.stages import RewardStage, from_cache

    ns = namespace("/c", "reward", "rewards", ModelConfig(path="r"), "sha3")
    reply = '[{{"role": "assistant", "content": "{}"}}]'.format
    table = _rows(**{C.PROMPT: ['[{"role": "user", "content": "p"}]'] * 2,
                     C.CANDIDATES: ['["x", "y", "z"]', None], C.CHOSEN: [None, reply("a")],
                     C.REJECTED: [None, reply("b")], C.CANDIDATE_REWARDS: [None, None],
                     ns.value_column: [[0.1, 0.9, -0.3], [2.0, 1.5]]})
    out = from_cache(table, RewardStage, {"cfg": ModelConfig(path="r"), "cache": ns, "pick": None})
    assert out.column(C.REWARD_CHOSEN).to_pylist() == [0.9, 2.0]
    assert out.column(C.REWARD_REJECTED).to_pylist() == [-0.3, 1.5]
    assert out.column(C.CANDIDATE_REWARDS).to_pylist()[0] == [0.1, 0.9, -0.3]
    assert [json.loads(out.column(c)[0].as_py())[0]["content"] for c in (C.CHOSEN, C.REJECTED)] == ["y", "z"]


def _cfg(uri: str, out: Path, policy: str, tiny: dict, cache: str | None):
    """The session's DPO run (tests/conftest.py) with another input, output, policy or cache."""
    return load_config(None, base=dpo_config(tiny, uri, str(out), policy=policy, cache=cache))


def _generations(cache: str) -> dict[str, list[str]]:
    """Namespace -> the names of its generations (`<kind>-<dtype>/<sha>/<settings>`)."""
    out = {}
    for gen in sorted(Path(cache).glob("*/*/v*/gen-*")):
        out.setdefault(str(gen.parent.relative_to(cache)), []).append(gen.name)
    return out


def _stored(cache: str, ns_id: str) -> pa.Table:
    return pq.read_table(Path(cache) / ns_id)


def _scored(out: Path) -> dict:
    return {r["pair_id"]: r for r in pq.read_table(out / "scored").to_pylist()}


def test_rescoring_a_new_policy_reuses_reference_and_rewards(tmp_path, tiny, dpo_run, capsys):
    """The session's DPO run (tests/conftest.py) filled a cold cache; a new policy then scores its lines and eight
    new ones from a copy of that cache; a rerun after compaction finds every value: no model loads, no actor
    starts, and every column equals what the models computed."""
    cache = str(tmp_path / "cache")
    shutil.copytree(dpo_run.cache, cache)  # the session's run stays as it is for the other tests
    first = _cfg(dpo_run.uri, dpo_run.out, tiny["policy"], tiny, cache)
    models = identify_models(first)
    spaces = {role: ns for role, (ns, _) in cache_namespaces(first, models).items()}
    assert {role: ns.loads() for role, ns in spaces.items()} == {"reward": 1, "policy": 1, "reference": 1}
    # one generation per namespace, a few files at most, each good row's value stored once
    assert _generations(cache) == {ns.id: [f"gen-{dpo_run.manifest['run_id']}"] for ns in spaces.values()}
    for ns in spaces.values():
        stored = _stored(cache, ns.id)
        assert stored.num_rows == N_GOOD and len(set(stored["key"].to_pylist())) == stored.num_rows
        assert len(list((Path(cache) / ns.id).rglob("*.parquet"))) == 1

    # a new policy over the same lines and eight new ones: the reference and reward model score only the new rows
    lines = dpo_input_lines() + UF.read_bytes().splitlines()[N_GOOD:N_GOOD + 8]
    (tmp_path / "more.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    new_policy = perturbed_copy(tiny["policy"], tmp_path / "policy-v2")
    second = _cfg(str(tmp_path / "more.jsonl"), tmp_path / "v2", new_policy, tiny, cache)
    manifest = score(second)
    assert manifest["timings"]["cache_lookup_s"] > 0
    assert manifest["from_cache_alone"] == []  # new rows for the reference and reward model, a new policy
    assert spaces["reference"].loads() == 2 and spaces["reward"].loads() == 2
    new_ns = cache_namespaces(second, identify_models(second))["policy"][0]
    assert new_ns.id != spaces["policy"].id and new_ns.loads() == 1
    gens = _generations(cache)
    assert len(gens[spaces["reference"].id]) == 2 and len(gens[new_ns.id]) == 1
    rescored = _scored(tmp_path / "v2")
    assert len(rescored) == N_GOOD + 8 and _stored(cache, spaces["reference"].id).num_rows == len(rescored)
    # the lookup's joins leave no trace in what is written: the same columns, in the same order and types
    assert pq.read_table(tmp_path / "v2" / "scored").schema == pq.read_table(dpo_run.out / "scored").schema
    full = _scored(dpo_run.out)
    for pid, row in full.items():  # the old rows' reference log-probs and rewards: the values the first run stored
        for col in ("reward_chosen", "reward_rejected", "ref_chosen_logps", "ref_rejected_logps"):
            assert rescored[pid][col] == row[col], (pid, col)
    assert any(rescored[p]["chosen_logps"] != full[p]["chosen_logps"] for p in full)  # the policy really changed

    # compacted into one generation each; a rerun then hits every row of every model: none is loaded
    capsys.readouterr()
    assert main(["compact-cache", cache]) == 0
    printed = capsys.readouterr().out
    for ns in (spaces["reference"], spaces["reward"]):
        assert f"{ns.id}: 2 generations merged into one" in printed
    assert f"{new_ns.id}: nothing to merge" in printed
    assert all(len(names) == 1 for names in _generations(cache).values())
    # two runs that overlapped both stored the same rows: the lookup must not repeat them
    shutil.copytree(Path(cache) / new_ns.id / _generations(cache)[new_ns.id][0], Path(cache) / new_ns.id / "gen-copy")
    loads = {ns.id: ns.loads() for ns in (*spaces.values(), new_ns)}
    third = score(_cfg(str(tmp_path / "more.jsonl"), tmp_path / "v3", new_policy, tiny, cache))
    assert {ns.id: ns.loads() for ns in (*spaces.values(), new_ns)} == loads
    assert third["from_cache_alone"] == ["policy", "reference", "reward"]  # no actor started: light tasks only
    assert third["counts"]["scored"] == len(rescored) and _scored(tmp_path / "v3").keys() == rescored.keys()
    for pid, row in _scored(tmp_path / "v3").items():  # every value from the cache = the value computed
        for col in COLUMNS:
            assert row[col] == pytest.approx(rescored[pid][col], rel=1e-12, abs=1e-12), (pid, col)


def test_compacting_a_cache_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["compact-cache", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"mapray: error: cache: no cache at {tmp_path / 'nowhere'}\n"
