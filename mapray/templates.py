"""Pairs -> token ids, exactly as the trainer downstream tokenizes and truncates them.

The convention is TRL's `DPOTrainer` (1.x: `trl/trainer/dpo_trainer.py`, `tokenize_fn` and
`DataCollatorForPreference`), so that `chosen_logps` / `ref_chosen_logps` are the numbers the trainer computes:
- conversational: prompt = chat template of the prompt with the generation prompt; sequence = chat template of
  prompt + completion, both tokenized by `apply_chat_template(tokenize=True)` (the template decides BOS).
- standard: plain text, no chat template: prompt = tokenizer(prompt); sequence = tokenizer(prompt + completion +
  EOS), EOS appended as text unless the completion already ends with it.
- the completion starts where the prompt's ids and the sequence's ids first differ (the smaller of the two
  responses' common prefixes), not at len(prompt ids): a template or a merge across the boundary can re-render
  the prompt's end.
- truncation, per sequence, after joining: `keep_start` keeps the first `max_length` tokens (and a pair whose
  prompt alone fills `max_length` is set aside: TRL drops it); `keep_end` keeps the last `max_length`. The first
  token of a sequence is never scored (nothing predicts it).
Special-token text inside a row (`<|im_start|>` in a prompt) becomes the special token, as it does in TRL; with
`split_special_tokens` row text is strictly text: the chat template's markup and the messages' contents are
tokenized apart, the contents with special tokens split.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from mapray.formats import Messages, RejectRow

# the TRL release whose DPOTrainer tokenization this module reproduces (recorded in the manifest)
TRL_CONVENTION = "trl>=1.16 DPOTrainer (tokenize_fn + DataCollatorForPreference)"

Sequence = tuple[list[int], list[int]]  # (context ids, scored response ids)


@dataclass(frozen=True)
class EncodedPair:
    chosen: Sequence
    rejected: Sequence
    chosen_truncated: bool
    rejected_truncated: bool

    def sequences(self) -> list[Sequence]:
        return [self.chosen, self.rejected]


class PairEncoder:
    """Encodes pairs with one model's tokenizer (and chat template, for conversational rows)."""

    def __init__(self, tokenizer, max_length: int, truncation_mode: str = "keep_start",
                 chat_template: str | None = None, split_special_tokens: bool = False):
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.split_special_tokens = split_special_tokens

    def encode_pair(self, prompt: str | Messages, chosen: str | Messages, rejected: str | Messages) -> EncodedPair:
        prompt_ids = self._ids(prompt, generation_prompt=True)
        full = [self._ids(prompt, completion) for completion in (chosen, rejected)]
        start = min(common_prefix_length(prompt_ids, ids) for ids in full)
        (c, c_cut), (r, r_cut) = (truncate(prompt_ids[:start], ids[start:], self.max_length, self.truncation_mode)
                                  for ids in full)
        return EncodedPair(c, r, c_cut, r_cut)

    def encode_prompt(self, prompt: str | Messages) -> list[int]:
        """The ids a model continues from, as `encode_pair` tokenizes the prompt (self-play samples from them)."""
        return self._ids(prompt, generation_prompt=True)

    def encode_full(self, prompt: str | Messages, completion: str | Messages) -> tuple[list[int], bool]:
        """One whole sequence (prompt + completion) for a reward model, as TRL's RewardTrainer builds it, cut to
        max_length from the end; with its truncation flag."""
        ids = self._ids(prompt, completion)
        return ids[:self.max_length], len(ids) > self.max_length

    def _ids(self, prompt: str | Messages, completion: str | Messages | None = None,
             generation_prompt: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return self._chat_ids(prompt + (completion or []), generation_prompt)
        return self._text_ids(prompt, completion)

    def _text_ids(self, prompt: str, completion: str | None) -> list[int]:
        eos = self.tokenizer.eos_token
        if completion is not None and eos is None:
            raise ValueError("the tokenizer has no eos_token: standard (plain-text) rows need one (TRL appends it)")
        if not self.split_special_tokens:
            text = prompt if completion is None else prompt + completion + ("" if completion.endswith(eos) else eos)
            return list(self.tokenizer(text)["input_ids"])
        ids = list(self.tokenizer(prompt + (completion or ""), split_special_tokens=True)["input_ids"])
        return ids if completion is None else ids + [self.tokenizer.eos_token_id]

    def _chat_ids(self, messages: Messages, generation_prompt: bool) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; set chat_template in the model config")
        if not self.split_special_tokens:
            return list(self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt)["input_ids"])
        # render with a placeholder per content, then tokenize the template's markup (special tokens parsed) and
        # the contents (special tokens split) apart
        marks = [f"\x00{uuid.uuid4().hex}\x00" for _ in messages]
        text = self.tokenizer.apply_chat_template(
            [dict(m, content=mark) for m, mark in zip(messages, marks)], tokenize=False,
            add_generation_prompt=generation_prompt)
        ids: list[int] = []
        for mark, message in zip(marks, messages):
            markup, found, text = text.partition(mark)
            if not found:
                raise RejectRow("the chat template rewrites message contents: split_special_tokens cannot apply")
            ids += self._piece(markup, split=False) + self._piece(message["content"], split=True)
        return ids + self._piece(text, split=False)

    def _piece(self, text: str, split: bool) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two id lists share."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def truncate(prompt: list[int], response: list[int], max_length: int, mode: str) -> tuple[Sequence, bool]:
    """One sequence cut the way TRL's collator cuts it: (context, scored response) and whether it was cut."""
    if not prompt:  # nothing predicts a sequence's first token: TRL's shifted completion mask skips it
        prompt, response = response[:1], response[1:]
    if not response:
        raise RejectRow("a response has no tokens after the prompt")
    if len(prompt) + len(response) <= max_length:
        return (prompt, response), False
    if mode == "keep_start":
        if len(prompt) >= max_length:
            raise RejectRow(f"the prompt alone fills max_length ({len(prompt)} >= {max_length} tokens; "
                            "TRL's DPOTrainer drops such pairs)")
        return (prompt, response[:max_length - len(prompt)]), True
    window = (prompt + response)[-max_length:]
    context = max(1, len(prompt) - (len(prompt) + len(response) - max_length))  # the first token is not scored
    return (window[:context], window[context:]), True
