import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from mapray.config import ColumnNames, ModelConfig
from mapray.formats import normalize_record
from mapray.scoring.batching import budget_batches
from mapray.scoring.torch_engine import TorchLogprobEngine, TorchRewardEngine
from mapray.templates import ChatEncoder
from mapray.testing.naive import naive_logprobs, naive_reward
from tests.conftest import HH, UF

TEXTS = ["heat the oven", "no", "first step: salt the steak, then heat it for about 10 minutes. " * 6,
         "a pen joke? what is a pen", "thanks!"]


def _sequences(tokenizer, max_length=512):
    enc = ChatEncoder(tokenizer, max_length)
    prompts = [[{"role": "user", "content": "how to cook"}],
               [{"role": "system", "content": "be good"}, {"role": "user", "content": "why " * 40}]]
    return [(pair.prompt, ids) for p in prompts for pair in [enc.encode_pair(p, TEXTS[0], TEXTS[2])]
            for ids in (pair.chosen, pair.rejected)] + [
        (pair.prompt, pair.chosen) for t in TEXTS[1:] for pair in [enc.encode_pair(prompts[0], t, "x")]]


def test_budget_batches_sorted_and_bounded():
    lengths = [5, 50, 10, 40, 100, 7]
    batches = budget_batches(lengths, 100)
    assert batches[0] == [4]  # longest first, alone when it fills the budget
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1


@pytest.mark.parametrize("budget,chunk", [(64, 3), (4096, 4096)])
def test_logprobs_equal_naive_full_logits(tiny, budget, chunk):
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy"])
    seqs = _sequences(tokenizer)
    budget = max(budget, max(len(p) + len(r) for p, r in seqs))
    engine = TorchLogprobEngine(ModelConfig(path=tiny["policy"], token_budget=budget, lm_head_chunk=chunk,
                                            max_length=budget), tiny["policy"])
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float32).eval()
    expected = naive_logprobs(model, seqs, batch_size=1)
    got = engine.logprobs(seqs)
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(v, 3) for v in got)) > 3  # the values really differ between sequences


def test_rewards_equal_unpadded_model_even_when_pad_is_the_last_token(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["reward"])
    enc = ChatEncoder(tokenizer, 512)
    seqs = [enc.encode_full([{"role": "user", "content": "how to cook"}], t)[0] for t in TEXTS]
    engine = TorchRewardEngine(ModelConfig(path=tiny["reward"]), tiny["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["reward"], dtype=torch.float32).eval()
    expected = [naive_reward(model, s) for s in seqs]
    assert engine.rewards(seqs) == pytest.approx(expected, abs=1e-5)
    # a pad id equal to every row's last token would make the head pool one token early
    engine.model.config.pad_token_id = seqs[0][-1]
    assert engine.rewards(seqs) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 4) for v in expected)) == len(TEXTS)


def _real_pairs(tokenizer, n=2):
    enc = ChatEncoder(tokenizer, 1024)
    cols = ColumnNames()
    recs = [("chat", json.loads(line)) for line in UF.read_text().splitlines()[:n]]
    recs += [("transcript", json.loads(line)) for line in HH.read_text().splitlines()[:n]]
    recs += [("text", {"prompt": "Name a prime number.", "chosen": "7 is prime.", "rejected": "Eight."})]
    recs += [("candidates", {"prompt": "Say hi.", "all_generated_responses": ["Hi!", "Hello there.", "Go"],
                             "all_rm_scores": [0.2, 0.9, 0.1]})]
    seqs = []
    for fmt, rec in recs:
        pair = normalize_record(rec, fmt, cols)
        encoded = enc.encode_pair(pair.prompt, pair.chosen, pair.rejected)
        seqs += encoded.sequences()
    return seqs


@pytest.mark.slow
def test_smollm2_logprobs_equal_naive_on_real_rows(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    seqs = _real_pairs(tokenizer)
    assert tokenizer.decode(seqs[0][0]).startswith("<|im_start|>system")  # SmolLM2's own ChatML template
    engine = TorchLogprobEngine(ModelConfig(path=smollm2, token_budget=2048, max_length=1024), smollm2)
    expected = naive_logprobs(engine.model, seqs, batch_size=1)
    assert engine.logprobs(seqs) == pytest.approx(expected, abs=1e-3)


def test_tree_batch_shares_the_prompt_and_isolates_responses():
    from mapray.scoring.packing import group_by_prompt, tree_batch

    rows = group_by_prompt([([1, 2, 3], [4, 5]), ([7], [8, 9, 10]), ([1, 2, 3], [6])])
    assert [(r.prompt, r.responses) for r in rows] == [([1, 2, 3], [(0, [4, 5]), (2, [6])]), ([7], [(1, [8, 9, 10])])]
    b = tree_batch(rows)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    assert b.position_ids.tolist()[0] == [0, 1, 2, 3, 4, 3]  # the second response restarts after the prompt
    assert b.attention_mask.shape == (2, 1, 6, 6)
    assert b.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # token 6 sees the prompt and itself, not the other response
    ]
    assert b.attention_mask[1, 0, 4:].int().tolist() == [[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]]  # padding: itself
    # token 4 is predicted from slot 2 (the last prompt token), 5 from 3; 6 also from slot 2
    assert list(zip(b.rows.tolist(), b.slots.tolist(), b.targets.tolist(), b.owners.tolist())) == [
        (0, 2, 4, 0), (0, 3, 5, 0), (0, 2, 6, 2), (1, 0, 8, 1), (1, 1, 9, 1), (1, 2, 10, 1)]


def test_split_long_keeps_each_response_whole():
    from mapray.scoring.packing import SharedPromptRow, split_long

    row = SharedPromptRow([1, 2], [(0, [3] * 5), (1, [4] * 3), (2, [5] * 9)])
    parts = split_long([row], max_tokens=10)
    assert [[i for i, _ in p.responses] for p in parts] == [[0, 1], [2]]
    assert all(p.prompt == [1, 2] for p in parts)


def _logprobs_and_body_tokens(engine, seqs):
    """The engine's log-probs, and the real (non-padding) tokens its model body ran on."""
    seen = []
    original = engine.body.forward

    def forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        seen.append(int((kwargs["position_ids"] > 0).sum()) + ids.shape[0])  # position 0 once per row
        return original(*args, **kwargs)

    engine.body.forward = forward
    try:
        return engine.logprobs(seqs), sum(seen)
    finally:
        del engine.body.forward


# float64 throughout; Llama's eager attention takes its softmax in float32, hence its looser bound
@pytest.mark.parametrize("attn,tol", [("sdpa", 1e-9), ("eager", 1e-5)])
def test_prefix_sharing_equals_separate_sequences_and_runs_each_prompt_once(tiny, attn, tol):
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy"])
    seqs = _sequences(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64, attn_implementation=attn)
    cfg = ModelConfig(path=tiny["policy"], token_budget=4096, max_length=4096, lm_head_chunk=7)
    shared = TorchLogprobEngine(cfg, model=model)
    assert shared.shared_max_tokens > 0
    got, body_tokens = _logprobs_and_body_tokens(shared, seqs)
    separate = TorchLogprobEngine(dataclasses.replace(cfg, prefix_sharing=False), model=model).logprobs(seqs)
    assert got == pytest.approx(separate, abs=tol)
    assert got == pytest.approx(naive_logprobs(model, seqs, batch_size=1), abs=tol)
    prompts = {tuple(p): len(p) for p, _ in seqs}
    assert body_tokens == sum(prompts.values()) + sum(len(r) for _, r in seqs)  # each distinct prompt once
    # rows longer than the shared limit are split, and a single sequence past it goes alone: same values
    shared.shared_max_tokens = max(len(p) + len(r) for p, r in seqs) - 1
    assert shared.logprobs(seqs) == pytest.approx(separate, abs=tol)


def test_prefix_sharing_stays_inside_a_sliding_window(tiny):
    from mapray.scoring.torch_engine import SHARED_PROMPT_MAX_TOKENS, shared_prompt_limit

    model = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    cfg = ModelConfig(path=tiny["policy"])
    assert shared_prompt_limit(cfg, model) == SHARED_PROMPT_MAX_TOKENS
    model.config.sliding_window = 100
    assert shared_prompt_limit(cfg, model) == 100
    model.config.use_sliding_window = False  # Qwen2's switch: the window is configured but not used
    assert shared_prompt_limit(cfg, model) == SHARED_PROMPT_MAX_TOKENS
    assert shared_prompt_limit(dataclasses.replace(cfg, prefix_sharing=False), model) == 0
