"""End to end on a real local Ray with tiny policy, reference and reward models built at test time."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapray import columns as C
from mapray import metrics
from mapray.config import ColumnNames, ModelConfig, load_config
from mapray.formats import assistant, normalize_record
from mapray.pipeline import reselect, score
from mapray.scoring.torch_engine import TorchLogprobEngine, TorchRewardEngine
from mapray.templates import PairEncoder
from tests.conftest import HH, N_GOOD, model_config


def test_outputs_schema_and_counts(dpo_run):
    manifest, records, out = dpo_run.manifest, dpo_run.records, dpo_run.out
    scored = pq.read_table(out / "scored")
    # TRL's columns (the scored pair, explicit prompt, conversational) first; UF's own prompt string and full
    # conversations are kept under original_*
    trl = ["prompt", "chosen", "rejected"]
    own = ["prompt_id", "original_prompt", "original_chosen", "original_rejected", "score_chosen", "score_rejected"]
    assert scored.column_names == trl + own + list(C.SCORED)
    assert all(scored.schema.field(name).type == C.MESSAGES for name in trl)
    for name, type_ in C.SCORED.items():
        assert scored.schema.field(name).type == type_, name
    assert sorted(scored.column("pair_id").to_pylist()) == sorted(r["prompt_id"] for r in records)
    counts = manifest["counts"]
    assert counts == {"input": N_GOOD + 3, "scored": N_GOOD, "rejected": 3, "selected": 12,
                      "model_pass_rows_this_attempt": 33, "rejected_by_code": counts["rejected_by_code"]}
    assert {code: entry["count"] for code, entry in counts["rejected_by_code"].items()} == {
        "empty_response": 1, "non_finite_score": 1, "invalid_json": 1}
    rejects = pq.read_table(out / "rejects").to_pylist()
    by_id = {r["pair_id"]: r for r in rejects}
    assert by_id["empty"]["reason"] == "empty chosen response" and by_id["empty"]["stage"] == "normalize"
    assert by_id["empty"]["reason_code"] == "empty_response"
    assert by_id["nan"]["reason"] == "score_chosen is NaN"
    assert json.loads(by_id["empty"]["raw"])["prompt_id"] == "empty"
    bad_json = next(r for r in rejects if r["pair_id"] is None)
    assert bad_json["reason"].startswith("invalid JSON") and bad_json["source"].endswith("uf.jsonl:11")
    selected = pq.read_table(out / "selected")
    assert sorted(selected.column("pair_id").to_pylist()) == sorted(
        p for p, s in zip(scored.column("pair_id").to_pylist(), scored.column("selected").to_pylist()) if s)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["counts"] == counts and on_disk["models"]["policy"]["sha256"] == manifest["models"]["policy"][
        "sha256"] and len(on_disk["models"]) == 3
    assert not (out / "_staging" / manifest["run_id"]).exists()
    import ray
    import transformers

    assert on_disk["libraries"]["ray"] == ray.__version__
    assert on_disk["libraries"]["transformers"] == transformers.__version__
    assert on_disk["config"]["metric"] == {"implicit": "dpo", "beta": 0.1, "alpha": 2.5}


def test_values_match_a_direct_computation(dpo_run, tiny):
    records, out = dpo_run.records, dpo_run.out
    rows = {r["pair_id"]: r for r in pq.read_table(out / "scored").to_pylist()}
    encoders, engines = {}, {}
    for role in ("policy", "reference", "reward"):
        from transformers import AutoTokenizer

        encoders[role] = PairEncoder(AutoTokenizer.from_pretrained(tiny[role]), 192, "keep_end")
    engines["policy"] = TorchLogprobEngine(ModelConfig(path=tiny["policy"]), tiny["policy"])
    engines["reference"] = TorchLogprobEngine(ModelConfig(path=tiny["reference"]), tiny["reference"])
    reward = TorchRewardEngine(ModelConfig(path=tiny["reward"]), tiny["reward"])
    for rec in records[:8]:
        pair = normalize_record(rec, "conversational", ColumnNames(id="prompt_id"))
        row = rows[pair.pair_id]
        enc = encoders["policy"].encode_pair(pair.prompt, pair.chosen, pair.rejected)
        lp = engines["policy"].logprobs(enc.sequences())
        ref = engines["reference"].logprobs(enc.sequences())
        rw = reward.rewards([encoders["reward"].encode_full(pair.prompt, t)[0] for t in (pair.chosen, pair.rejected)])
        assert (row["chosen_logps"], row["rejected_logps"]) == pytest.approx(lp, abs=1e-4)
        assert (row["ref_chosen_logps"], row["ref_rejected_logps"]) == pytest.approx(ref, abs=1e-4)
        assert (row["reward_chosen"], row["reward_rejected"]) == pytest.approx(rw, abs=1e-4)
        assert (row["chosen_tokens"], row["rejected_tokens"]) == (len(enc.chosen[1]), len(enc.rejected[1]))
        assert (row["chosen_truncated"], row["rejected_truncated"]) == (enc.chosen_truncated, enc.rejected_truncated)
        m_ex = rw[0] - rw[1]
        m_im = 0.1 * (lp[0] - ref[0]) - 0.1 * (lp[1] - ref[1])
        assert row["explicit_margin"] == pytest.approx(m_ex, abs=1e-4)
        assert row["implicit_margin"] == pytest.approx(m_im, abs=1e-4)
        assert row["map"] == pytest.approx(abs(m_ex) - 2.5 * abs(m_im), abs=1e-4)
        assert row["map_unreg"] == pytest.approx(m_ex - 2.5 * m_im, abs=1e-4)
    assert any(r["chosen_truncated"] or r["rejected_truncated"] for r in rows.values())  # max_length 192 bites


def test_map_z_and_selection_equal_a_direct_top_k(dpo_run):
    manifest, out = dpo_run.manifest, dpo_run.out
    t = pq.read_table(out / "scored")
    m_ex, m_im = t.column("explicit_margin").to_numpy(), t.column("implicit_margin").to_numpy()
    z = (m_ex - m_ex.mean()) / m_ex.std() - 2.5 * (np.abs(m_im) - np.abs(m_im).mean()) / np.abs(m_im).std()
    assert t.column("map_z").to_numpy() == pytest.approx(z, abs=1e-9)
    ids = t.column("pair_id").to_pylist()
    expected = metrics.top_k_mask(z, ids, int(len(ids) * 0.4))
    assert t.column("selected").to_pylist() == expected.tolist()
    assert manifest["pool_moments"]["explicit_margin"]["std"] == pytest.approx(m_ex.std())


def test_reselect_by_another_metric_without_models(dpo_run, tmp_path):
    import shutil

    manifest, out = dpo_run.manifest, tmp_path / "out"
    shutil.copytree(dpo_run.out, out)  # the session's run stays as it is for the other tests
    again = reselect(str(out), load_config(None, base={"input": {"uri": "x"}, "output": "x", "policy": {
        "path": "x"}, "selection": {"metric": "explicit_margin", "top_k": 5}}, ).selection)
    t = pq.read_table(out / "scored")
    expected = metrics.top_k_mask(t.column("explicit_margin").to_numpy(), t.column("pair_id").to_pylist(), 5)
    assert t.column("selected").to_pylist() == expected.tolist()
    assert pq.read_table(out / "selected").num_rows == 5
    assert again["counts"]["input"] == manifest["counts"]["input"] and again["counts"]["selected"] == 5
    assert pq.read_table(out / "rejects").num_rows == 3  # rejects/ untouched
    assert json.loads((out / "manifest.json").read_text())["config"]["selection"]["metric"] == "explicit_margin"


@pytest.mark.parametrize("metric,rule,value", [("map", "threshold", 0.0), ("map_unreg", "top_k", 7),
                                               ("map_z", "ratio", 0.3)])
def test_reselect_with_a_new_alpha_recomputes_every_map_form(dpo_run, tmp_path, metric, rule, value):
    """alpha has one way in: a reselection with alpha 0.7 (the run used 2.5) gives, for every MAP form, the
    values and the selected set computed here from the scored margins."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(dpo_run.out, out)  # the session's run stays as it is for the other tests
    manifest = reselect(str(out), load_config(None, base={"input": {"uri": "x"}, "output": "x", "policy": {
        "path": "x"}, "selection": {"metric": metric, rule: value}}).selection, alpha=0.7)
    t = pq.read_table(out / "scored")
    m_ex, m_im = t.column("explicit_margin").to_numpy(), t.column("implicit_margin").to_numpy()
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731 (population std, over the whole pool)
    expected = {"map": np.abs(m_ex) - 0.7 * np.abs(m_im), "map_unreg": m_ex - 0.7 * m_im,
                "map_z": z(m_ex) - 0.7 * z(np.abs(m_im))}
    for name, values in expected.items():
        assert t.column(name).to_numpy() == pytest.approx(values, abs=1e-9), name
    ids = t.column("pair_id").to_pylist()
    keep = expected[metric] > value if rule == "threshold" else metrics.top_k_mask(
        expected[metric], ids, metrics.selection_count(len(ids), rule, value))
    assert t.column("selected").to_pylist() == keep.tolist() and 0 < keep.sum() < len(ids)
    assert sorted(pq.read_table(out / "selected").column("pair_id").to_pylist()) == sorted(
        i for i, k in zip(ids, keep) if k)
    assert manifest["selection"] | {"cutoff": None} == {"metric": metric, "alpha": 0.7, "rule": rule, rule: value,
                                                        "selected": int(keep.sum()), "cutoff": None}
    assert manifest["config"]["metric"]["alpha"] == 0.7
    assert "- metric: `" + metric + "`, alpha 0.7" in (out / "README.md").read_text()


def test_candidates_without_scores_are_picked_by_the_reward_model(tmp_path, tiny, local_ray):
    rows = [{"uid": f"p{i}", "prompt": f"question {i}: how to cook?",
             "all_generated_responses": [f"answer {j} for {i}" * (j + 1) for j in range(4)]} for i in range(6)]
    rows.append({"uid": "dup", "prompt": "q", "all_generated_responses": ["same", "same"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cands.parquet")
    cfg = load_config(None, base={
        "input": {"uri": f"file://{tmp_path}/cands.parquet", "columns": {"id": "uid"}},
        "output": str(tmp_path / "out"), "policy": model_config(tiny["policy"]),
        "reward": {"source": "model", "model": model_config(tiny["reward"])}, "selection": {"top_k": 2},
    })
    manifest = score(cfg)
    assert manifest["counts"]["scored"] == 6 and manifest["counts"]["rejected"] == 1
    assert pq.read_table(tmp_path / "out" / "rejects").column("reason").to_pylist() == [
        "fewer than 2 distinct candidates"]
    from transformers import AutoTokenizer

    enc = PairEncoder(AutoTokenizer.from_pretrained(tiny["reward"]), 192)
    reward = TorchRewardEngine(ModelConfig(path=tiny["reward"]), tiny["reward"])
    scored = {r["pair_id"]: r for r in pq.read_table(tmp_path / "out" / "scored").to_pylist()}
    for rec in rows[:6]:
        prompt = [{"role": "user", "content": rec["prompt"]}]
        values = reward.rewards([enc.encode_full(prompt, assistant(t))[0] for t in rec["all_generated_responses"]])
        row = scored[rec["uid"]]
        assert row["reward_chosen"] == pytest.approx(max(values), abs=1e-4)
        assert row["reward_rejected"] == pytest.approx(min(values), abs=1e-4)
        assert row["explicit_margin"] >= 0
    assert sum(r["selected"] for r in scored.values()) == 2


@pytest.fixture(scope="module")
def hh_run(tmp_path_factory, tiny, local_ray) -> tuple:
    """Anthropic HH transcripts scored from a working directory, with relative input, output and cache paths
    (`mapray demo` writes to out/demo). Returns that directory and the manifest."""
    home = tmp_path_factory.mktemp("hh")
    lines = HH.read_bytes().splitlines()[80:100]  # holds the file's empty-response row
    (home / "hh").mkdir()
    (home / "hh" / "hh.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = load_config(None, base={
        "input": {"uri": "hh"}, "output": "out/rel", "cache": "cache", "policy": model_config(tiny["policy"]),
        "reward": {"source": "model", "model": model_config(tiny["reward"])},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        manifest = score(cfg)
    return home, manifest


def test_hh_transcripts_with_real_defects(hh_run):
    home, manifest = hh_run
    assert manifest["counts"]["input"] == 20 and manifest["counts"]["rejected"] == 1
    assert manifest["counts"]["rejected_by_code"] == {"empty_response": {"count": 1,
                                                                         "example": "empty chosen response"}}
    scored = pq.read_table(home / "out" / "rel" / "scored")
    assert scored.num_rows == 19 and scored.column("ref_chosen_logps").null_count == 19
    # simpo: beta / |y| * logp with the default beta 2.0
    r = scored.slice(0, 1).to_pylist()[0]
    assert r["implicit_reward_chosen"] == pytest.approx(2.0 * r["chosen_logps"] / r["chosen_tokens"])


def test_publish_never_shows_a_mix_of_two_runs(tmp_path, monkeypatch):
    """A publish that dies half-way leaves no manifest.json: readers see "no complete result", never old
    selected/ under new scored/; the next publish completes."""
    from mapray.config import ConfigError
    from mapray.outputs import OutputLayout, read_manifest, write_manifest

    out = tmp_path / "out"
    for name in ("scored", "selected", "rejects"):
        (out / name).mkdir(parents=True)
        (out / name / "old.parquet").write_text("old")
    write_manifest(str(out), {"run_id": "old"})
    layout = OutputLayout(str(out), run_id="new")
    for name in ("scored", "selected", "rejects"):
        (out / "_staging" / "new" / name).mkdir(parents=True)
        (out / "_staging" / "new" / name / "new.parquet").write_text("new")
    real_mv, moved = layout.fs.mv, []

    def crash_after_first(src, dst, **kw):
        if moved:
            raise OSError("killed mid-publish")
        moved.append(dst)
        real_mv(src, dst, **kw)

    monkeypatch.setattr(layout.fs, "mv", crash_after_first)
    with pytest.raises(OSError):
        layout.publish({"run_id": "new"})
    assert (out / "scored" / "new.parquet").exists() and not (out / "manifest.json").exists()
    with pytest.raises(ConfigError, match="publishing it right now"):
        read_manifest(str(out))
    monkeypatch.setattr(layout.fs, "mv", real_mv)
    layout.publish({"run_id": "new"})
    assert read_manifest(str(out))["run_id"] == "new"
    assert all((out / n / "new.parquet").exists() and not (out / n / "old.parquet").exists()
               for n in ("scored", "selected", "rejects"))
    assert not (out / "_staging" / "new").exists()


def test_tensor_parallel_actors_get_a_placement_group_of_gpu_bundles(local_ray):
    from ray.util.placement_group import remove_placement_group

    from mapray.runtime import _tensor_parallel_group

    model = ModelConfig(path="x", engine="vllm", tensor_parallel_size=4, cpus_per_actor=2.0, gpus_per_actor=1.0)
    strategy = _tensor_parallel_group(model)["scheduling_strategy"]
    assert strategy.placement_group.bundle_specs == [{"CPU": 2.0, "GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0},
                                                     {"GPU": 1.0}]
    assert strategy.placement_group_capture_child_tasks and strategy.placement_group_bundle_index == 0
    remove_placement_group(strategy.placement_group)  # a CPU machine never schedules it


def test_relative_output_and_cache_paths_resolve_against_the_working_directory(hh_run, monkeypatch):
    # Ray Data's checkpoint refuses relative paths, so they are resolved first
    from mapray.uris import absolute

    home, manifest = hh_run
    assert manifest["counts"]["input"] == 20
    assert (home / "out" / "rel" / "manifest.json").exists()
    assert pq.read_table(home / "out" / "rel" / "scored").num_rows == manifest["counts"]["scored"] > 0
    assert list((home / "cache").glob("logprobs-float32/*/v*/gen-*/*.parquet"))  # the run stored here
    monkeypatch.chdir(home)
    assert absolute("out/rel") == str(home / "out" / "rel")
    assert absolute("file://out/x") == str(home / "out" / "x")
    assert absolute("s3://bucket/out") == "s3://bucket/out"
