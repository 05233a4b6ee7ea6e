import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from mapray.config import ModelConfig
from mapray.formats import assistant
from mapray.scoring.batching import budget_batches
from mapray.scoring.torch_engine import TREE_MASK_MAX_TOKENS, TorchLogprobEngine, TorchRewardEngine
from mapray.templates import PairEncoder
from mapray.testing.naive import naive_logprobs, naive_reward

TEXTS = ["heat the oven", "no", "first step: salt the steak, then heat it for about 10 minutes. " * 6,
         "a pen joke? what is a pen", "thanks!"]


def _sequences(tokenizer, max_length=512):
    enc = PairEncoder(tokenizer, max_length)
    prompts = [[{"role": "user", "content": "how to cook"}],
               [{"role": "system", "content": "be good"}, {"role": "user", "content": "why " * 40}]]
    pairs = [enc.encode_pair(p, assistant(TEXTS[0]), assistant(TEXTS[2])) for p in prompts]
    return [seq for pair in pairs for seq in pair.sequences()] + [
        enc.encode_pair(prompts[0], assistant(t), assistant("x")).chosen for t in TEXTS[1:]]


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


@pytest.mark.parametrize("packing", [True, False])
def test_rewards_equal_unpadded_model_even_when_pad_is_the_last_token(tiny, packing):
    tokenizer = AutoTokenizer.from_pretrained(tiny["reward"])
    enc = PairEncoder(tokenizer, 512)
    seqs = [enc.encode_full([{"role": "user", "content": "how to cook"}], assistant(t))[0] for t in TEXTS]
    engine = TorchRewardEngine(ModelConfig(path=tiny["reward"], packing=packing), tiny["reward"])
    assert (engine.tree_limit > 0) == packing
    model = AutoModelForSequenceClassification.from_pretrained(tiny["reward"], dtype=torch.float32).eval()
    expected = [naive_reward(model, s) for s in seqs]
    assert engine.rewards(seqs) == pytest.approx(expected, abs=1e-5)
    # a pad id equal to every row's last token would make the head pool one token early
    engine.model.config.pad_token_id = seqs[0][-1]
    assert engine.rewards(seqs) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 4) for v in expected)) == len(TEXTS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rewards_equal_one_sequence_at_a_time(tiny, attn):
    tokenizer = AutoTokenizer.from_pretrained(tiny["reward"])
    enc = PairEncoder(tokenizer, 512)
    seqs = [enc.encode_full([{"role": "user", "content": f"question {k}"}], assistant(t))[0]
            for k in range(3) for t in TEXTS]
    model = AutoModelForSequenceClassification.from_pretrained(tiny["reward"], dtype=torch.float64,
                                                               attn_implementation=attn).eval()
    expected = [naive_reward(model, s) for s in seqs]
    engine = TorchRewardEngine(ModelConfig(path=tiny["reward"], token_budget=512), model=model)
    got, real, _, _ = _with_work(engine.rewards, seqs)
    assert got == pytest.approx(expected, abs=1e-9 if attn == "sdpa" else 1e-5)
    # each question's templated prompt is computed once for its five answers (or more: a common prefix)
    prompts = [enc.encode_pair([{"role": "user", "content": f"question {k}"}], assistant("a"), assistant("b")).chosen[0]
               for k in range(3)]
    assert real <= sum(map(len, seqs)) - sum(4 * len(p) for p in prompts)
    engine.tree_limit = sorted(map(len, seqs))[len(seqs) // 2]  # half packed, half through the padded path
    assert engine.rewards(seqs) == pytest.approx(expected, abs=1e-9 if attn == "sdpa" else 1e-5)


@pytest.mark.slow
def test_smollm2_logprobs_equal_naive_on_real_rows(smollm2_rows):
    rows = smollm2_rows
    assert rows.tokenizer.decode(rows.seqs[0][0]).startswith("<|im_start|>system")  # SmolLM2's own ChatML template
    expected = naive_logprobs(rows.engine.model, rows.seqs, batch_size=1)
    assert rows.logps == pytest.approx(expected, abs=1e-3)


def test_tree_batch_shares_the_prompt_and_isolates_responses():
    from mapray.scoring.packing import group_by_prompt, tree_batch

    rows = group_by_prompt([([1, 2, 3], [4, 5]), ([7], [8, 9, 10]), ([1, 2, 3], [6])])
    assert [(r.prompt, r.responses) for r in rows] == [([1, 2, 3], [(0, [4, 5]), (2, [6])]), ([7], [(1, [8, 9, 10])])]
    b = tree_batch([[rows[0]], [rows[1]]])
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
    assert b.attention_mask[1, 0, 4:].int().tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]  # padding: itself
    # token 4 is predicted from slot 2 (the last prompt token), 5 from 3; 6 also from slot 2
    assert list(zip(b.rows.tolist(), b.slots.tolist(), b.targets.tolist(), b.owners.tolist())) == [
        (0, 2, 4, 0), (0, 3, 5, 0), (0, 2, 6, 2), (1, 0, 8, 1), (1, 1, 9, 1), (1, 2, 10, 1)]
    plain = tree_batch([[rows[1]]], tree=False)
    assert plain.attention_mask.tolist() == [[1, 1, 1, 1]]


def test_packed_rows_sit_side_by_side_without_seeing_each_other():
    from mapray.scoring.packing import SharedPromptRow, tree_batch

    first, second = SharedPromptRow([1, 2], [(0, [3]), (1, [4])]), SharedPromptRow([7], [(2, [8, 9])])
    b = tree_batch([[first, second]])
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 7, 8, 9]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 0, 1, 2]]  # each packed row starts at position 0
    assert b.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],  # the second row's prompt sees nothing of the first row
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1],
    ]
    assert list(zip(b.slots.tolist(), b.targets.tolist(), b.owners.tolist())) == [
        (1, 3, 0), (1, 4, 1), (4, 8, 2), (5, 9, 2)]


def test_block_mask_is_the_tree_mask_and_skips_the_tiles_nobody_sees():
    from torch.nn.attention.flex_attention import create_mask

    from mapray.scoring.packing import FLEX_BLOCK, SharedPromptRow, tree_batch

    # two prompt rows side by side (each 2.5 tiles long) and a short one in a second batch row
    long = [SharedPromptRow(list(range(1, 101)), [(0, [5] * 110), (1, [6] * 110)]),
            SharedPromptRow([7] * 20, [(2, [8] * 300)])]
    packed = [long, [SharedPromptRow([9], [(3, [10, 11])])]]
    dense, block = tree_batch(packed), tree_batch(packed, block_mask=True)
    width = block.input_ids.shape[1]
    assert width == 5 * FLEX_BLOCK and dense.input_ids.shape[1] == 640  # rounded up to whole tiles
    assert block.input_ids[:, :640].equal(dense.input_ids) and block.slots.equal(dense.slots)
    mask = block.attention_mask
    assert mask.shape == (2, 1, width, width)
    every_slot = create_mask(mask.mask_mod, 2, 1, width, width, device="cpu")
    assert every_slot[:, :, :640, :640].equal(dense.attention_mask)
    tail = every_slot[:, 0, 640:, :]  # slots added by the rounding: padding that sees itself only
    assert tail.sum().item() == 0
    assert every_slot[1, 0, 3:640].equal(torch.eye(640)[3:].bool())  # the short row's padding, too
    # tiles no query of the tile sees are never computed: fewer than a causal mask would compute
    computed = (mask.kv_num_blocks + mask.full_kv_num_blocks).sum().item()
    tiles = width // FLEX_BLOCK
    assert computed < 2 * tiles * (tiles + 1) // 2


def test_flex_attention_gives_the_values_of_separate_sequences(tiny):
    """FlexAttention over the block mask (tree_attention: flex) against one sequence at a time, and against the
    dense mask's values; float32 (FlexAttention on CPU takes no float64)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy"])
    enc = PairEncoder(tokenizer, 512)
    short_pairs = [enc.encode_pair([{"role": "user", "content": f"count to {k}"}], assistant("1 2 3" * k),
                                   assistant("no")) for k in range(1, 5)]
    seqs = _sequences(tokenizer) + [seq for pair in short_pairs for seq in pair.sequences()]
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float32)
    expected = naive_logprobs(model, seqs, batch_size=1)
    cfg = ModelConfig(path=tiny["policy"], token_budget=1024, max_length=512)
    dense = TorchLogprobEngine(cfg, model=model).logprobs(seqs)
    flex = TorchLogprobEngine(dataclasses.replace(cfg, tree_attention="flex"), model=model)
    assert model.config._attn_implementation == "flex_attention" and flex.tree_limit > TREE_MASK_MAX_TOKENS
    got, real, _, shapes = _with_work(flex.logprobs, seqs)
    assert got == pytest.approx(expected, abs=1e-4) and got == pytest.approx(dense, abs=1e-4)
    assert real == sum(len(p) for p in {tuple(p) for p, _ in seqs}) + sum(len(r) for _, r in seqs)
    # packed up to the token budget (a block mask costs the tiles used): one row, whole tiles
    assert shapes == [(1, -(-real // 128) * 128)] and real <= cfg.token_budget

    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny["reward"], dtype=torch.float32).eval()
    full = [p + r for p, r in seqs]
    expected = [naive_reward(reward_model, s) for s in full]
    rewards = TorchRewardEngine(ModelConfig(path=tiny["reward"], tree_attention="flex"), model=reward_model)
    assert rewards.rewards(full) == pytest.approx(expected, abs=1e-5)


def test_flex_attention_refused_by_a_model_in_one_line(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float32)

    def cannot(implementation):
        raise ValueError("LlamaForCausalLM does not support an attention implementation through torch's "
                         "flex_attention yet.\nsecond line")

    model.set_attn_implementation = cannot
    with pytest.raises(ValueError) as e:
        TorchLogprobEngine(ModelConfig(path=tiny["policy"], tree_attention="flex"), model=model)
    assert str(e.value).count("\n") == 0 and str(e.value).endswith("use tree_attention: mask")


def test_common_prefix_groups_pairs_not_the_shared_system_prompt():
    from mapray.scoring.packing import group_by_common_prefix

    system = [9, 9, 9]  # common to every sequence: must not glue unrelated rows together
    seqs = [system + [1, 1, 5], system + [2, 2, 2, 7], system + [1, 1, 6, 6], system + [3], system + [2, 2, 2, 8],
            system + [2, 2, 2]]
    rows = group_by_common_prefix(seqs)
    assert [(r.prompt, r.responses) for r in rows] == [
        (system + [1, 1], [(0, [5]), (2, [6, 6])]),
        (system + [2, 2], [(5, [2]), (1, [2, 7]), (4, [2, 8])]),  # a whole sequence keeps its last token
        ([], [(3, system + [3])]),
    ]
    lone_first = [system + [0], system + [5, 5, 1], system + [5, 5, 2]]  # the lone one does not take a partner
    assert [len(r.responses) for r in group_by_common_prefix(lone_first)] == [1, 2]
    assert group_by_common_prefix([]) == []


def test_pack_is_first_fit_decreasing_within_capacity():
    from mapray.scoring.packing import SharedPromptRow, pack

    rows = [SharedPromptRow([0] * n, [(i, [1])]) for i, n in enumerate([2, 9, 4, 5, 1])]  # lengths 3 10 5 6 2
    packed = pack(rows, capacity=10)
    assert [[len(r) for r in members] for members in packed] == [[10], [6, 3], [5, 2]]
    assert sorted(owner for members in packed for r in members for owner, _ in r.responses) == [0, 1, 2, 3, 4]


def test_split_long_keeps_each_response_whole():
    from mapray.scoring.packing import SharedPromptRow, split_long

    row = SharedPromptRow([1, 2], [(0, [3] * 5), (1, [4] * 3), (2, [5] * 9)])
    parts = split_long([row], max_tokens=10)
    assert [[i for i, _ in p.responses] for p in parts] == [[0, 1], [2]]
    assert all(p.prompt == [1, 2] for p in parts)
    assert [len(p.responses) for p in split_long([row], max_tokens=0)] == [1, 1, 1]


def test_plan_rows_packs_what_fits_and_sends_the_rest_alone():
    from mapray.scoring.packing import SharedPromptRow, plan_rows

    rows = [SharedPromptRow([1], [(0, [2] * 3), (1, [3] * 4)]), SharedPromptRow([4], [(2, [5] * 9)]),
            SharedPromptRow([6], [(3, [7])])]  # lengths 8, 10, 2
    packed, alone = plan_rows(rows, limit=8)
    assert [[len(r) for r in members] for members in packed] == [[8], [2]]
    assert [(r.prompt, r.responses) for r in alone] == [([4], [(2, [5] * 9)])]
    packed, _ = plan_rows(rows, limit=8, packing=False)
    assert [[len(r) for r in members] for members in packed] == [[8], [2]]
    three = SharedPromptRow([8], [(4, [9, 9])])
    packed, _ = plan_rows(rows[:1] + rows[2:] + [three], limit=10)  # packed up to the longest row
    assert [[len(r) for r in members] for members in packed] == [[8], [3, 2]]
    packed, _ = plan_rows(rows, limit=10, capacity=20)  # the block mask's layout: up to the token budget
    assert [[len(r) for r in members] for members in packed] == [[10, 8, 2]]
    packed, alone = plan_rows(rows, limit=0)  # no tree mask: every response alone
    assert packed == [] and sorted(r.responses[0][0] for r in alone) == [0, 1, 2, 3]


def _with_work(score, seqs):
    """score(seqs), the real tokens its tree batches held, the slots (rows x width) they took, and their shapes."""
    from mapray.scoring import torch_engine

    real, shapes = [], []

    def recording(packed, *args, **kwargs):
        batch = build(packed, *args, **kwargs)
        real.append(sum(len(row) for members in packed for row in members))
        shapes.append(tuple(batch.input_ids.shape))
        return batch

    build, torch_engine.tree_batch = torch_engine.tree_batch, recording
    try:
        return score(seqs), sum(real), sum(r * w for r, w in shapes), shapes
    finally:
        torch_engine.tree_batch = build


# float64 throughout; Llama's eager attention takes its softmax in float32, hence its looser bound
@pytest.mark.parametrize("attn,tol", [("sdpa", 1e-9), ("eager", 1e-5)])
def test_prefix_sharing_and_packing_equal_separate_sequences(tiny, attn, tol):
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy"])
    enc = PairEncoder(tokenizer, 512)
    short_pairs = [enc.encode_pair([{"role": "user", "content": f"count to {k}"}], assistant("1 2 3" * k),
                                   assistant("no")) for k in range(1, 5)]
    seqs = _sequences(tokenizer) + [seq for pair in short_pairs for seq in pair.sequences()]
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64, attn_implementation=attn)
    expected = naive_logprobs(model, seqs, batch_size=1)
    cfg = ModelConfig(path=tiny["policy"], token_budget=4096, max_length=4096, lm_head_chunk=7)
    prompts_once = sum(len(p) for p in {tuple(p) for p, _ in seqs}) + sum(len(r) for _, r in seqs)
    every_prompt = sum(len(p) + len(r) for p, r in seqs)
    work = {}
    for sharing, packing in [(True, True), (True, False), (False, True), (False, False)]:
        engine = TorchLogprobEngine(dataclasses.replace(cfg, prefix_sharing=sharing, packing=packing), model=model)
        got, real, slots, _ = _with_work(engine.logprobs, seqs)
        assert got == pytest.approx(expected, abs=tol), (sharing, packing)
        assert real == (prompts_once if sharing else every_prompt)  # each distinct prompt once
        work[sharing, packing] = slots
        # rows longer than the tree-mask limit are split, and a sequence past it goes alone: same values
        engine.tree_limit = max(len(p) + len(r) for p, r in seqs) - 1
        assert engine.logprobs(seqs) == pytest.approx(expected, abs=tol)
    assert work[True, True] < work[True, False] and work[False, True] < work[False, False]  # less padding
    assert work[True, True] < work[False, True]


def test_tree_mask_stays_inside_a_sliding_window(tiny):
    from mapray.scoring.torch_engine import FLEX_MAX_TOKENS, tree_mask_limit

    model = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    cfg = ModelConfig(path=tiny["policy"])
    assert tree_mask_limit(cfg, model) == TREE_MASK_MAX_TOKENS
    model.config.sliding_window = 100
    assert tree_mask_limit(cfg, model) == 100
    model.config.use_sliding_window = False  # Qwen2's switch: the window is configured but not used
    assert tree_mask_limit(cfg, model) == TREE_MASK_MAX_TOKENS
    assert tree_mask_limit(dataclasses.replace(cfg, prefix_sharing=False), model) == TREE_MASK_MAX_TOKENS
    assert tree_mask_limit(dataclasses.replace(cfg, prefix_sharing=False, packing=False), model) == 0
    model.config._attn_implementation = "flex_attention"  # a block mask: no width^2 tensor, only the window
    assert tree_mask_limit(cfg, model) == FLEX_MAX_TOKENS
    model.config.use_sliding_window = True
    assert tree_mask_limit(cfg, model) == 100
    model.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask
    assert tree_mask_limit(cfg, model) == 0
