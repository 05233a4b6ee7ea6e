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
