"""mapray's log-probs against TRL's own DPOTrainer, and TRL training on mapray's selected/ as it is.

TRL itself (PyPI `trl`) is the reference: its `_precompute_ref_logps` path tokenizes, truncates and scores rows of
each of its four preference types; mapray's normalize -> log-prob stages must give the same numbers in float32
(TRL's DPOConfig defaults to bf16 autocast: bf16=False here). Real UltraFeedback text, cut at a max_length that
truncates most rows and makes a few prompts fill it (TRL drops those; mapray sets them aside).
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapray import columns as C
from mapray.config import ColumnNames, ModelConfig, load_config
from mapray.normalize import Normalizer, NormalizeSpec
from mapray.stages import LogprobStage
from tests.conftest import UF

os.environ.setdefault("TQDM_DISABLE", "1")
trl = pytest.importorskip("trl")

MAX_LENGTH = 128
N = 12


def _uf_rows() -> list[dict]:
    rows = []
    for line in UF.read_text().splitlines()[:N]:
        rec = json.loads(line)
        rows.append({"id": rec["prompt_id"], "question": rec["prompt"], "good": rec["chosen"][-1]["content"],
                     "bad": rec["rejected"][-1]["content"]})
    return rows


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def trl_type_rows(kind: str) -> list[dict]:
    """The same pairs in each of TRL's four preference types (docs/source/dataset_formats.md)."""
    out = []
    for k, r in enumerate(_uf_rows()):
        if kind == "standard_explicit":
            row = {"prompt": r["question"], "chosen": " " + r["good"], "rejected": " " + r["bad"]}
        elif kind == "standard_implicit":
            row = {"chosen": r["question"] + " " + r["good"], "rejected": r["question"] + " " + r["bad"]}
        elif kind == "conversational_explicit":
            prompt = [_user(r["question"])]
            if k % 3 == 0:  # system and tool turns, as TRL allows
                prompt = [{"role": "system", "content": "Answer briefly."}, _user("Look it up."),
                          _assistant("Calling the search tool."), {"role": "tool", "content": "no results"},
                          _user(r["question"])]
            row = {"prompt": prompt, "chosen": [_assistant(r["good"])], "rejected": [_assistant(r["bad"])]}
        else:
            row = {"chosen": [_user(r["question"]), _assistant(r["good"])],
                   "rejected": [_user(r["question"]), _assistant(r["bad"])]}
        out.append({"id": r["id"], **row})
    return out


def mapray_logps(rows: list[dict], fmt: str, tiny: dict) -> dict[str, dict]:
    """mapray's own path without Ray: normalize, then the policy and reference log-prob stages."""
    spec = NormalizeSpec(fmt, ColumnNames(id="id"), needs_scores=False, max_row_chars=10**6, own_schema=None)
    table = Normalizer(spec)(pa.Table.from_pylist(rows))
    for role in ("policy", "reference"):
        cfg = ModelConfig(path=tiny[role], max_length=MAX_LENGTH, token_budget=4096)
        table = LogprobStage(cfg, role=role)(table)
    out = {}
    for row in table.to_pylist():
        out[row[C.PAIR_ID]] = row
    return out


def trl_logps(rows: list[dict], model_path: str, ref_path: str | None, tmp_path, tokenizer_path: str,
              key: str = "id"):
    """TRL's own numbers: DPOTrainer's reference precompute, with the given model as its reference."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, max_length=MAX_LENGTH,
                         bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=4)
    trainer = trl.DPOTrainer(model=load(model_path), ref_model=load(ref_path) if ref_path else None, args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(tokenizer_path))
    ds = trainer.train_dataset
    return {i: (c, r) for i, c, r in zip(ds[key], ds["ref_chosen_logps"], ds["ref_rejected_logps"])}


@pytest.mark.parametrize("kind,fmt", [("standard_explicit", "standard"), ("standard_implicit", "standard"),
                                      ("conversational_explicit", "conversational"),
                                      ("conversational_implicit", "conversational")])
def test_logps_equal_trl_dpo_trainer(kind, fmt, tiny, tmp_path):
    rows = trl_type_rows(kind)
    mine = mapray_logps(rows, fmt, tiny)
    policy = trl_logps(rows, tiny["policy"], None, tmp_path, tiny["policy"])
    reference = trl_logps(rows, tiny["policy"], tiny["reference"], tmp_path, tiny["policy"])
    # TRL drops the pairs whose prompt alone fills max_length; mapray sets exactly those aside, with the reason
    dropped = {i for i, row in mine.items() if row[C.REJECT] is not None}
    assert set(policy) == set(mine) - dropped and 0 < len(dropped) <= len(rows) - 4, dropped
    assert all("prompt alone fills max_length" in mine[i][C.REJECT] for i in dropped)
    assert sum(mine[i]["chosen_truncated"] or mine[i]["rejected_truncated"] for i in policy) >= 3  # cut rows too
    got = {i: [mine[i][k] for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]
           for i in policy}
    assert_equal_to_trl(got, {i: [*policy[i], *reference[i]] for i in policy}, kind)


def assert_equal_to_trl(got: dict, want: dict, what: str) -> None:
    """TRL returns float32 sums: past |128| one float32 step (ulp) is already 1.5e-5, so the bound is 1e-5 or two
    of TRL's own ulps, whichever is larger."""
    worst, worst_ulps = 0.0, 0.0
    for key in want:
        for a, b in zip(got[key], want[key]):
            ulp = float(np.spacing(np.float32(abs(b))))
            worst, worst_ulps = max(worst, abs(a - b)), max(worst_ulps, abs(a - b) / ulp)
            assert abs(a - b) <= max(1e-5, 2 * ulp), (key, got[key], want[key])
    print(f"{what}: {len(want)} pairs, largest |mapray - TRL| {worst:.2e} ({worst_ulps:.2f} float32 ulps)")


@pytest.fixture(scope="module")
def dpo_output(tmp_path_factory, tiny, local_ray):
    """A DPO run (policy + reference, UltraFeedback's own scores) on real rows, truncated at MAX_LENGTH."""
    from mapray.pipeline import score

    tmp = tmp_path_factory.mktemp("handoff")
    (tmp / "uf.jsonl").write_text("\n".join(UF.read_text().splitlines()[:24]) + "\n")

    def model(role):
        return {"path": tiny[role], "max_length": MAX_LENGTH, "token_budget": 4096, "batch_size": 8,
                "cpus_per_actor": 0.5}

    cfg = load_config(None, base={"input": {"uri": str(tmp / "uf.jsonl"), "columns": {"id": "prompt_id"}},
                                  "output": str(tmp / "out"), "policy": model("policy"),
                                  "reference": model("reference"), "metric": {"implicit": "dpo"},
                                  "selection": {"ratio": 0.5}})
    manifest = score(cfg)
    return tmp / "out", manifest


def _selected_dataset(out):
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(out / "selected" / "*.parquet"), split="train")


def test_selected_has_trl_columns_and_keeps_the_input(dpo_output):
    out, manifest = dpo_output
    scored = pq.read_table(out / "scored")
    assert scored.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert scored.schema.field("prompt").type == C.MESSAGES
    source = {json.loads(x)["prompt_id"]: json.loads(x) for x in UF.read_text().splitlines()[:24]}
    for row in scored.to_pylist():
        rec = source[row["pair_id"]]
        assert row["prompt"] == rec["chosen"][:-1] and row["chosen"] == rec["chosen"][-1:]
        assert row["rejected"] == rec["rejected"][-1:]
        # UltraFeedback's own prompt string and full conversations, kept under documented names
        assert row["original_prompt"] == rec["prompt"] and row["original_chosen"] == rec["chosen"]
    assert manifest["tokenization"]["format"] == "conversational"


def test_trl_recomputes_the_same_reference_logps_from_selected(dpo_output, tiny, tmp_path):
    out, _ = dpo_output
    selected = _selected_dataset(out)
    assert len(selected) > 0
    theirs = trl_logps(selected.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]).to_list(),
                       tiny["policy"], tiny["reference"], tmp_path, tiny["policy"], key="pair_id")
    mine = {r["pair_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in selected.to_list()}
    assert set(theirs) == set(mine)
    assert_equal_to_trl(mine, theirs, "selected/ read back by TRL")


def test_trl_trains_on_selected_with_mapray_reference_logps(dpo_output, tiny, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mapray.handoff import MaprayDPOTrainer

    out, _ = dpo_output
    selected = _selected_dataset(out)

    def no_reference_pass(*args, **kwargs):
        raise AssertionError("TRL ran a reference forward although mapray's reference log-probs were given")

    monkeypatch.setattr(trl.DPOTrainer, "compute_ref_log_probs", no_reference_pass)
    args = trl.DPOConfig(output_dir=str(tmp_path / "ckpt"), precompute_ref_log_probs=True, max_length=MAX_LENGTH,
                         bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=len(selected),
                         max_steps=2,
                         logging_steps=1, save_strategy="no")
    trainer = MaprayDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float32),
                               args=args, train_dataset=selected,
                               processing_class=AutoTokenizer.from_pretrained(tiny["policy"]))
    assert trainer.ref_model is None
    assert trainer.train_dataset["ref_chosen_logps"] == selected["ref_chosen_logps"]
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    # the first step's loss is DPO's on mapray's numbers: the policy is still the scored checkpoint, so the
    # log-ratio margin is mapray's (policy - reference) margin, and the loss of the first batch (all of selected/)
    # is the mean of -log sigmoid(beta * margin)
    first = trainer.state.log_history[0]
    batch = selected
    margins = [(c - rc) - (r - rr) for c, r, rc, rr in zip(batch["chosen_logps"], batch["rejected_logps"],
                                                            batch["ref_chosen_logps"], batch["ref_rejected_logps"])]
    expected = float(torch.nn.functional.softplus(-args.beta * torch.tensor(margins)).mean())
    assert first["loss"] == pytest.approx(expected, abs=1e-4)


def test_handoff_refuses_null_reference_columns(tiny, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mapray.handoff import MaprayDPOTrainer

    rows = [dict(r, ref_chosen_logps=None, ref_rejected_logps=None) for r in trl_type_rows("standard_explicit")]
    args = trl.DPOConfig(output_dir=str(tmp_path / "x"), precompute_ref_log_probs=True, bf16=False, use_cpu=True,
                         report_to="none")
    with pytest.raises(ValueError, match="ref_chosen_logps has nulls"):
        MaprayDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float32),
                         args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tiny["policy"]))
