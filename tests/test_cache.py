"""Incremental rescoring: a new policy checkpoint reruns only the policy; the reference and reward models are
not even loaded on a full cache hit, and the results equal a full run without the cache."""

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
from mapray.outputs import read_manifest
from mapray.pipeline import cache_namespaces, score
from mapray.testing.tiny_models import perturbed_copy
from tests.conftest import N_GOOD, dpo_config, dpo_input_lines

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
    # an older policy over the first 16 lines of the session's DPO run; that run itself is the uncached run of the
    # new policy (tiny["policy"]) over all its lines, which the rescoring below must equal
    (tmp_path / "first.jsonl").write_bytes(b"\n".join(dpo_input_lines()[:16]) + b"\n")
    cache = str(tmp_path / "cache")
    old_policy = perturbed_copy(tiny["policy"], tmp_path / "policy-v1")
    first = _cfg(str(tmp_path / "first.jsonl"), tmp_path / "v1", old_policy, tiny, cache)
    score(first)
    models = identify_models(first)
    spaces = {role: ns for role, (ns, _) in cache_namespaces(first, models).items()}
    assert {role: ns.loads() for role, ns in spaces.items()} == {"reward": 1, "policy": 1, "reference": 1}
    # one generation per namespace, a few files at most, each good row's value stored once
    assert _generations(cache) == {ns.id: [f"gen-{read_manifest(str(tmp_path / 'v1'))['run_id']}"]
                                   for ns in spaces.values()}
    for ns in spaces.values():
        stored = _stored(cache, ns.id)
        assert stored.num_rows == len(_scored(tmp_path / "v1")) and len(set(stored["key"].to_pylist())) == \
            stored.num_rows
        assert len(list((Path(cache) / ns.id).rglob("*.parquet"))) == 1

    # the new policy over the same 16 lines and 17 new ones: the reference and reward model score only the new rows
    second = _cfg(dpo_run.uri, tmp_path / "v2", tiny["policy"], tiny, cache)
    manifest = score(second)
    assert manifest["timings"]["cache_lookup_s"] > 0
    assert manifest["from_cache_alone"] == []  # new rows for the reference and reward model, a new policy
    assert spaces["reference"].loads() == 2 and spaces["reward"].loads() == 2
    new_ns = cache_namespaces(second, identify_models(second))["policy"][0]
    assert new_ns.id != spaces["policy"].id and new_ns.loads() == 1
    gens = _generations(cache)
    assert len(gens[spaces["reference"].id]) == 2 and len(gens[new_ns.id]) == 1
    assert _stored(cache, spaces["reference"].id).num_rows == len(_scored(tmp_path / "v2"))  # only new rows added

    cached, full = _scored(tmp_path / "v2"), _scored(dpo_run.out)
    # the lookup's joins leave no trace in what is written: the same columns, in the same order and types
    assert pq.read_table(tmp_path / "v2" / "scored").schema == pq.read_table(dpo_run.out / "scored").schema
    assert cached.keys() == full.keys() and len(full) == N_GOOD
    for pid, row in full.items():  # to fp32 rounding: cached rows were scored in other batches than these
        for col in COLUMNS:
            assert cached[pid][col] == pytest.approx(row[col], rel=1e-6, abs=1e-5), (pid, col)
    old = _scored(tmp_path / "v1")
    assert any(old[p]["chosen_logps"] != full[p]["chosen_logps"] for p in old)  # the policy really changed

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
    third = score(_cfg(dpo_run.uri, tmp_path / "v3", tiny["policy"], tiny, cache))  # policy's values twice, too
    assert {ns.id: ns.loads() for ns in (*spaces.values(), new_ns)} == loads
    assert third["from_cache_alone"] == ["policy", "reference", "reward"]  # no actor started: light tasks only
    assert third["counts"]["scored"] == N_GOOD and _scored(tmp_path / "v3").keys() == full.keys()
    for pid, row in _scored(tmp_path / "v3").items():
        for col in COLUMNS:
            assert row[col] == pytest.approx(cached[pid][col], rel=1e-6, abs=1e-5), (pid, col)


def test_compacting_a_cache_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["compact-cache", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"mapray: error: cache: no cache at {tmp_path / 'nowhere'}\n"
