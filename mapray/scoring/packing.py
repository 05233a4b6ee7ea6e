"""Shared-prompt rows: a prompt and all of its responses in one row, the prompt computed once.

A pair's chosen and rejected responses continue the same prompt. Scoring them as two sequences runs the prompt
through the model twice; here one row holds `prompt | response 1 | response 2 | ...` and an attention mask
shaped like a tree: prompt tokens see the prompt causally, each response token sees the whole prompt and the
earlier tokens of its own response, never another response. Each response's position ids restart where the
prompt ends, so every response token gets exactly the attention inputs and positions it has in its own
sequence: the log-probs equal the per-sequence ones (tests/test_torch_engine.py), for P + R1 + R2 tokens of
work instead of 2P + R1 + R2.

Padding slots at the end of a row attend to themselves only: a slot that attends to nothing has a NaN
softmax, and a NaN value leaks into real rows through the next layer's attention (0 x NaN = NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT = -1  # segment id of prompt slots; responses are 0, 1, ...; padding slots get their own unique ids


@dataclass(frozen=True)
class SharedPromptRow:
    prompt: list[int]
    responses: list[tuple[int, list[int]]]  # (index of the sequence in the caller's list, response ids)

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for _, r in self.responses)


@dataclass(frozen=True)
class TreeBatch:
    input_ids: torch.Tensor  # (rows, width)
    position_ids: torch.Tensor  # (rows, width)
    # tree: (rows, 1, width, width), True where a query slot may attend a key slot; else (rows, width) padding
    attention_mask: torch.Tensor
    rows: torch.Tensor  # for every response token: its row,
    slots: torch.Tensor  # the slot whose hidden state predicts it,
    targets: torch.Tensor  # the token itself,
    owners: torch.Tensor  # and the index of its sequence in the caller's list


def group_by_prompt(sequences: list[tuple[list[int], list[int]]]) -> list[SharedPromptRow]:
    """Sequences with identical prompt ids become one row, in first-seen order."""
    rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (prompt, response) in enumerate(sequences):
        rows.setdefault(tuple(prompt), []).append((i, response))
    return [SharedPromptRow(list(prompt), responses) for prompt, responses in rows.items()]


def split_long(rows: list[SharedPromptRow], max_tokens: int) -> list[SharedPromptRow]:
    """Rows longer than `max_tokens` split into smaller rows of the same prompt (one response at least)."""
    out = []
    for row in rows:
        current: list[tuple[int, list[int]]] = []
        for item in row.responses:
            if current and len(row.prompt) + sum(len(r) for _, r in current) + len(item[1]) > max_tokens:
                out.append(SharedPromptRow(row.prompt, current))
                current = []
            current.append(item)
        out.append(SharedPromptRow(row.prompt, current))
    return out


def tree_batch(rows: list[SharedPromptRow], tree: bool = True) -> TreeBatch:
    """The batch's tensors; `tree=False` (rows of one response each) gives a plain 2D padding mask instead."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    # padding slots: unique negative ids below PROMPT, so a padding slot matches only itself
    segments = -2 - torch.arange(width).repeat(len(rows), 1)
    row_of, slot_of, targets, owners = [], [], [], []
    for b, row in enumerate(rows):
        p = len(row.prompt)
        ids[b, :p] = torch.tensor(row.prompt)
        positions[b, :p] = torch.arange(p)
        segments[b, :p] = PROMPT
        start = p
        for k, (owner, response) in enumerate(row.responses):
            n = len(response)
            ids[b, start:start + n] = torch.tensor(response)
            positions[b, start:start + n] = torch.arange(p, p + n)
            segments[b, start:start + n] = k
            # the first response token is predicted by the last prompt slot, token j by the slot of token j - 1
            slot_of += [p - 1] + list(range(start, start + n - 1))
            row_of += [b] * n
            targets += response
            owners += [owner] * n
            start += n
    if not tree:
        mask = (segments >= PROMPT).long()
        return TreeBatch(ids, positions, mask, torch.tensor(row_of), torch.tensor(slot_of), torch.tensor(targets),
                         torch.tensor(owners))
    slot = torch.arange(width)
    causal = slot[:, None] >= slot[None, :]
    same_branch = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == PROMPT)
    mask = (causal[None] & same_branch)[:, None]
    return TreeBatch(ids, positions, mask, torch.tensor(row_of), torch.tensor(slot_of), torch.tensor(targets),
                     torch.tensor(owners))
