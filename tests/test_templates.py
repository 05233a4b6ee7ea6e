import pytest
from transformers import AutoTokenizer

from mapray.formats import RejectRow
from mapray.templates import ChatEncoder, truncate_pair

PROMPT = [{"role": "user", "content": "how to cook a steak"}]


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny["policy"])


def test_split_follows_the_trl_convention(tokenizer):
    enc = ChatEncoder(tokenizer, max_length=512)
    pair = enc.encode_pair(PROMPT, "heat the oven", "no")
    full = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": "heat the oven"}], tokenize=False)
    assert tokenizer.decode(pair.prompt + pair.chosen) == "<s>" + full
    assert tokenizer.decode(pair.chosen) == "heat the oven<|im_end|>\n"  # the end-of-turn token is scored
    assert pair.prompt == tokenizer(enc.prompt_text(PROMPT))["input_ids"]
    assert not pair.chosen_truncated and not pair.rejected_truncated


def test_no_double_bos_when_the_template_starts_with_bos(tokenizer):
    bos = tokenizer.bos_token_id
    plain = ChatEncoder(tokenizer, 512).encode_pair(PROMPT, "a", "b").prompt
    assert plain[0] == bos and plain[1] != bos
    with_bos = ChatEncoder(tokenizer, 512, chat_template="<s>" + tokenizer.chat_template)
    ids = with_bos.encode_pair(PROMPT, "a", "b").prompt
    assert ids[0] == bos and ids[1] != bos
    assert ids == plain  # same tokens either way


def test_truncation_cuts_prompt_left_then_response_right():
    prompt, chosen, rejected = list(range(10)), list(range(100, 120)), list(range(200, 205))
    pair = truncate_pair(prompt, chosen, rejected, max_length=16, max_prompt_length=6)
    assert pair.prompt == list(range(4, 10))  # the prompt's last 6 tokens
    assert pair.chosen == list(range(100, 110)) and pair.rejected == rejected
    assert pair.chosen_truncated and pair.rejected_truncated  # both lost prompt context
    untouched = truncate_pair(prompt, chosen[:3], rejected, max_length=16, max_prompt_length=6)
    assert untouched.prompt == prompt and not untouched.chosen_truncated and not untouched.rejected_truncated
    only_response = truncate_pair(prompt[:4], chosen, rejected, max_length=16, max_prompt_length=6)
    assert only_response.chosen == chosen[:12] and only_response.chosen_truncated
    assert not only_response.rejected_truncated


def test_template_that_rewrites_the_prompt_is_rejected(tokenizer):
    odd = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(RejectRow, match="renders the prompt differently"):
        ChatEncoder(tokenizer, 512, chat_template=odd).encode_pair(PROMPT, "a", "b")


def test_missing_chat_template_is_a_clear_error(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ChatEncoder(tokenizer, 512)
