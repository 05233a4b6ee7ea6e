"""Length-sorted batches under a padded-token budget."""

from __future__ import annotations


def budget_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so that (rows x longest row) <= token_budget, longest rows first.

    Sorting by length keeps padding small; starting with the longest batch makes an out-of-memory failure
    happen on the first step rather than hours in. A row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
