"""Shared-prompt rows: a prompt and all of its responses in one row, the prompt computed once.

A pair's chosen and rejected responses continue the same prompt. Scoring them as two sequences runs the prompt
through the model twice; here one row holds `prompt | response 1 | response 2 | ...` and an attention mask
shaped like a tree: prompt tokens see the prompt causally, each response token sees the whole prompt and the
earlier tokens of its own response, never another response. Each response's position ids restart where the
prompt ends, so every response token gets exactly the attention inputs and positions it has in its own
sequence: the log-probs equal the per-sequence ones (tests/test_torch_engine.py), for P + R1 + R2 tokens of
work instead of 2P + R1 + R2.

Several such rows are packed side by side into one row of the batch (block-diagonal: a row never sees
another), so a batch is not padded to its longest row. Padding slots at the end of a packed row attend to
themselves only: a slot that attends to nothing has a NaN softmax, and a NaN value leaks into real rows
through the next layer's attention (0 x NaN = NaN).

The tree mask comes in two forms (`ModelConfig.tree_attention`): a dense rows x width^2 boolean mask for the
model's SDPA or eager attention, or a FlexAttention block mask built from the same per-slot ids (a `mask_mod`),
which holds only which 128 x 128 tiles are empty, full or partly masked: the kernel skips empty tiles (another
packed row, another response) and no width^2 tensor exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mapray.templates import common_prefix_length

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

PROMPT = -1  # branch id of prompt slots; responses are 0, 1, ...
# FlexAttention's tile (its default): a block-mask row is padded to whole tiles, fewer distinct widths for the
# compiled kernel to meet
FLEX_BLOCK = 128


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
    # tree: (rows, 1, width, width), True where a query slot may attend a key slot, or that mask as a FlexAttention
    # BlockMask; else (rows, width) padding
    attention_mask: torch.Tensor | BlockMask
    rows: torch.Tensor  # for every response token: its row,
    slots: torch.Tensor  # the slot whose hidden state predicts it,
    targets: torch.Tensor  # the token itself,
    owners: torch.Tensor  # the index of its sequence in the caller's list,
    token_slots: torch.Tensor  # and the slot it sits in


def group_by_prompt(sequences: list[tuple[list[int], list[int]]]) -> list[SharedPromptRow]:
    """Sequences with identical prompt ids become one row, in first-seen order."""
    rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (prompt, response) in enumerate(sequences):
        rows.setdefault(tuple(prompt), []).append((i, response))
    return [SharedPromptRow(list(prompt), responses) for prompt, responses in rows.items()]


def group_by_common_prefix(sequences: list[list[int]], min_shared: int = 1) -> list[SharedPromptRow]:
    """Whole sequences (a reward model's input) grouped under a shared leading part of at least `min_shared`
    tokens, each member keeping one token of its own.

    Any shared prefix gives the same values, so the grouping only decides the speed-up. Sorted, a pair's
    chosen and rejected (the same templated prompt) sit next to each other; a group grows while the next
    sequence shares all of the group's prefix, and a lone sequence joins the next one only if that one does
    not share more with the one after it (so a system prompt common to every row does not glue the rows).
    """
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    # lcp[k]: tokens sequence k (in sorted order) shares with k + 1; zeros past the end
    lcp = [common_prefix_length(sequences[a], sequences[b]) for a, b in zip(order, order[1:])] + [0, 0]
    rows: list[SharedPromptRow] = []
    start = 0
    while start < len(order):
        end, shared = start + 1, 0
        if lcp[start] >= max(min_shared, 1) and lcp[start] >= lcp[start + 1]:
            shared = lcp[start]
            end = start + 2
            while end < len(order) and lcp[end - 1] >= shared:
                end += 1
        members = order[start:end]
        cut = min([shared] + [len(sequences[i]) - 1 for i in members]) if len(members) > 1 else 0
        rows.append(SharedPromptRow(sequences[members[0]][:cut], [(i, sequences[i][cut:]) for i in members]))
        start = end
    return rows


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


def pack(rows: list[SharedPromptRow], capacity: int) -> list[list[SharedPromptRow]]:
    """Rows placed into packed rows of at most `capacity` tokens, first-fit decreasing.

    The engine is called on one Ray batch at a time, whose rows' lengths spread widely (~50 to 2,100 tokens in
    the shipped UltraFeedback sample): padded to the longest, a batch is half padding; packed, a few percent.
    """
    bins: list[tuple[int, list[SharedPromptRow]]] = []
    for row in sorted(rows, key=len, reverse=True):
        for k, (used, members) in enumerate(bins):
            if used + len(row) <= capacity:
                bins[k] = (used + len(row), members + [row])
                break
        else:
            bins.append((len(row), [row]))
    return [members for _, members in bins]


def plan_rows(rows: list[SharedPromptRow], limit: int, packing: bool = True,
              capacity: int = 0) -> tuple[list[list[SharedPromptRow]], list[SharedPromptRow]]:
    """The tree-mask path's packed rows (rows of at most `limit` tokens side by side, or one each without
    `packing`) and the rest: every response of a longer row on its own (a limit of 0: all of them).

    A packed row holds up to `capacity` tokens, or the longest row's length if that is more. The dense mask's
    cost grows with width^2, so it packs to the longest row (capacity 0); a block mask's attention costs only
    the tiles its rows use, so the FlexAttention path packs up to the token budget: fewer, wider rows, one
    padded tail each."""
    rows = split_long(rows, limit)
    fits = [row for row in rows if len(row) <= limit]
    alone = [SharedPromptRow(row.prompt, [item]) for row in rows if len(row) > limit for item in row.responses]
    packed = pack(fits, max(capacity, *map(len, fits))) if packing and fits else [[row] for row in fits]
    return packed, alone


def tree_batch(packed: list[list[SharedPromptRow]], tree: bool = True, device: torch.device | str = "cpu",
               block_mask: bool = False) -> TreeBatch:
    """The batch's tensors for packed rows (each a list of prompt rows side by side). `tree=False` (one
    sequence per packed row) gives a plain 2D padding mask instead of the 4D one. The mask, rows x width^2, is
    built on `device` from the per-slot ids (no host copy of it to make or transfer); `block_mask=True` gives it
    as a FlexAttention BlockMask instead, the width padded to a multiple of `FLEX_BLOCK`."""
    width = max(sum(len(row) for row in members) for members in packed)
    if block_mask:
        width = -(-width // FLEX_BLOCK) * FLEX_BLOCK
    ids = torch.zeros(len(packed), width, dtype=torch.long)
    positions = torch.zeros(len(packed), width, dtype=torch.long)
    # which prompt row a slot belongs to (padding: a unique negative id, so it matches only itself), and its
    # branch: PROMPT, or the response's number
    groups = -1 - torch.arange(width).repeat(len(packed), 1)
    branches = torch.zeros(len(packed), width, dtype=torch.long)
    row_of, slot_of, targets, owners, token_slots = [], [], [], [], []
    for b, members in enumerate(packed):
        start = 0
        for g, row in enumerate(members):
            p, base = len(row.prompt), start
            ids[b, start:start + p] = torch.tensor(row.prompt)
            positions[b, start:start + p] = torch.arange(p)
            groups[b, start:start + p] = g
            branches[b, start:start + p] = PROMPT
            start += p
            for k, (owner, response) in enumerate(row.responses):
                n = len(response)
                ids[b, start:start + n] = torch.tensor(response)
                positions[b, start:start + n] = torch.arange(p, p + n)
                groups[b, start:start + n] = g
                branches[b, start:start + n] = k
                # the first response token is predicted by the last prompt slot, token j by token j - 1's slot
                slot_of += [base + p - 1] + list(range(start, start + n - 1))
                row_of += [b] * n
                targets += response
                owners += [owner] * n
                token_slots += range(start, start + n)
                start += n
    gather = (torch.tensor(row_of), torch.tensor(slot_of), torch.tensor(targets), torch.tensor(owners),
              torch.tensor(token_slots))
    if not tree:
        return TreeBatch(ids, positions, (groups >= 0).long(), *gather)
    groups, branches = groups.to(device), branches.to(device)
    if block_mask:
        return TreeBatch(ids, positions, tree_block_mask(groups, branches), *gather)
    slot = torch.arange(width, device=device)
    mask = tree_visible(groups, branches, slice(None), slot[:, None], slot[None, :])[:, None]
    return TreeBatch(ids, positions, mask, *gather)


def tree_visible(groups: torch.Tensor, branches: torch.Tensor, b, q, kv) -> torch.Tensor:
    """Whether query slot `q` of row `b` may attend key slot `kv`: causal, in the same packed prompt row, and
    in the same response or in the prompt. The dense mask and the block mask's `mask_mod` are this one rule."""
    same_row = groups[b, q] == groups[b, kv]
    same_branch = (branches[b, q] == branches[b, kv]) | (branches[b, kv] == PROMPT)
    return (q >= kv) & same_row & same_branch


def tree_block_mask(groups: torch.Tensor, branches: torch.Tensor) -> BlockMask:
    """The tree mask as a FlexAttention BlockMask over (rows, width) slot ids. On CUDA the tiles are found by a
    compiled pass that never holds the dense mask; on CPU (tests, small runs) the uncompiled pass does."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = groups.shape

    def mask_mod(b, h, q, kv):
        return tree_visible(groups, branches, b, q, kv)

    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=groups.device,
                             BLOCK_SIZE=FLEX_BLOCK, _compile=groups.device.type == "cuda")
