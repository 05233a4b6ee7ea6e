"""How much of a batch is padding, and what it costs, for the torch engine's batching on real length spreads.

No model runs: the pairs' token lengths (benchmarks/lengths/, from the shipped samples) go through the engine's
own grouping, packing and token-budget batching, one Ray batch (`--engine-batch` pairs) at a time, and each
batch is costed in FLOPs: 2 x non-embedding params per slot (padding included) plus attention over each row's
full width squared (SDPA given a mask computes every query-key pair: 4 x hidden x layers each), against the
ideal (every pair's own tokens, prompt once, no padding, causal attention only). The LM head is left out: it
runs on response positions only, the same for every variant.

    python benchmarks/padding_model.py --lengths benchmarks/lengths/ultrafeedback-smollm2.jsonl
"""

from __future__ import annotations

import argparse
import json

from mapray.scoring.batching import budget_batches
from mapray.scoring.packing import SharedPromptRow, group_by_prompt, plan_rows
from mapray.scoring.torch_engine import TREE_MASK_MAX_TOKENS

SHAPES = {"1b": (2 * 1.24e9, 4 * 2048 * 16), "8b": (2 * 6.98e9, 4 * 4096 * 32)}  # body FLOPs/token, attn/pair


def rows_for(lengths, sharing: bool) -> list[SharedPromptRow]:
    """Rows of dummy ids with the given lengths (distinct prompts per pair, as in the samples)."""
    seqs = []
    for k, (p, c, r) in enumerate(lengths):
        prompt = [k] * p
        seqs += [(prompt, [0] * c), (prompt, [0] * r)]
    if sharing:
        return group_by_prompt(seqs)
    return [SharedPromptRow(prompt, [(i, response)]) for i, (prompt, response) in enumerate(seqs)]


def cost(lengths, sharing: bool, packing: bool, budget: int, engine_batch: int, shape: str):
    body, attn = SHAPES[shape]
    real = slots = flops = 0.0
    for start in range(0, len(lengths), engine_batch):
        # the engine's own plan: with neither lever it takes no tree mask, and every sequence goes alone
        limit = TREE_MASK_MAX_TOKENS if sharing or packing else 0
        packed, alone = plan_rows(rows_for(lengths[start:start + engine_batch], sharing), limit, packing)
        units = packed + [[row] for row in alone]
        widths = [sum(map(len, members)) for members in units]
        for batch in budget_batches(widths, budget):
            width = max(widths[i] for i in batch)
            real += sum(widths[i] for i in batch)
            slots += width * len(batch)
            flops += len(batch) * width * (body + attn * width)
    ideal = sum((p + c + r) * body + (p * p / 2 + (p + c / 2) * c + (p + r / 2) * r) * attn
                for p, c, r in lengths)
    return slots / real - 1, flops / ideal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", required=True, help="JSON lines [prompt, chosen, rejected] token counts")
    parser.add_argument("--max-length", type=int, default=2048, help="pairs truncated to this, as in a run")
    parser.add_argument("--engine-batch", type=int, default=64, help="pairs per engine call (Ray batch_size)")
    parser.add_argument("--budgets", default="8192,32768")
    args = parser.parse_args()
    from bench_scoring import file_lengths

    lengths = file_lengths(args.lengths, 10**9, args.max_length)
    for budget in map(int, args.budgets.split(",")):
        for sharing, packing in [(False, False), (False, True), (True, False), (True, True)]:
            row = {"lengths": args.lengths.rsplit("/", 1)[-1], "pairs": len(lengths), "budget": budget,
                   "engine_batch": args.engine_batch, "prefix_sharing": sharing, "packing": packing}
            for shape in SHAPES:
                padding, ratio = cost(lengths, sharing, packing, budget, args.engine_batch, shape)
                row["padding"] = round(padding, 3)
                row[f"flops_vs_ideal_{shape}"] = round(ratio, 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
