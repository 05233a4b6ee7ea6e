"""Chat template -> token ids, split into prompt and response, truncated the way trainers truncate.

Convention (the text split TRL uses): prompt text = template(prompt, add_generation_prompt=True); completion
text = template(prompt + [assistant response])[len(prompt text):]; ids = tokens(prompt text) +
tokens(completion text, no special tokens). The prompt's special tokens are added only when the template text
does not already start with BOS, so a sequence never carries two BOS tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from mapray.formats import RejectRow


@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_truncated: bool
    rejected_truncated: bool

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return [(self.prompt, self.chosen), (self.prompt, self.rejected)]


class ChatEncoder:
    """Encodes prompts and responses with one model's tokenizer and chat template."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None,
                 chat_template: str | None = None):
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; set chat_template in the model config")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length or max_length // 2

    def prompt_text(self, prompt: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def completion_text(self, prompt: list[dict], prompt_text: str, response: str) -> str:
        full = self.tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(prompt_text):
            raise RejectRow("the chat template renders the prompt differently once a response follows")
        return full[len(prompt_text):]

    def encode_text(self, text: str, first: bool) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = first and not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def encode_pair(self, prompt: list[dict], chosen: str, rejected: str) -> EncodedPair:
        prompt_text = self.prompt_text(prompt)
        prompt_ids = self.encode_text(prompt_text, first=True)
        responses = [self.encode_text(self.completion_text(prompt, prompt_text, r), first=False)
                     for r in (chosen, rejected)]
        return truncate_pair(prompt_ids, responses[0], responses[1], self.max_length, self.max_prompt_length)

    def encode_full(self, prompt: list[dict], response: str) -> tuple[list[int], bool]:
        """One sequence (prompt + response) for a reward model, with its truncation flag."""
        prompt_text = self.prompt_text(prompt)
        prompt_ids = self.encode_text(prompt_text, first=True)
        response_ids = self.encode_text(self.completion_text(prompt, prompt_text, response), first=False)
        pair = truncate_pair(prompt_ids, response_ids, response_ids, self.max_length, self.max_prompt_length)
        return pair.prompt + pair.chosen, pair.chosen_truncated


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: int) -> EncodedPair:
    """TRL's order: when the longer sequence exceeds max_length, keep the prompt's last max_prompt_length
    tokens, then cut each response from the right to what is left. Both responses share one prompt cut."""
    longest = max(len(chosen), len(rejected))
    prompt_cut = False
    if len(prompt) + longest > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        prompt_cut = True
    room = max_length - len(prompt)
    return EncodedPair(
        prompt=prompt,
        chosen=chosen[:room],
        rejected=rejected[:room],
        chosen_truncated=prompt_cut or len(chosen) > room,
        rejected_truncated=prompt_cut or len(rejected) > room,
    )
