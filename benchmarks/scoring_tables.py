"""bench_scoring.py's JSON lines -> one Markdown table per case, for benchmarks/README.md.

Each table: every method of the case with pairs/s, its speed-up over the naive trainer recipe on the same
pairs in the same process (the recipe takes no token budget: a case without its own naive row uses the one
measured on the same pairs at another budget), both utilisation figures (FLOPs actually needed, each prompt
once, and the per-sequence equivalent), peak memory and the exactness check; a method that failed shows its
error. TRL's precompute (gpu_run.sh's peers step) gets its own table with the engine it ran beside.

    python benchmarks/scoring_tables.py gpu-results/bench.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys


def case_of(row: dict) -> tuple:
    """The rows measured together: same model, lengths, pairs, budget, LM-head chunk and the plan line's methods
    (gpu_run.sh's peers step measures the engine again beside TRL, in another process)."""
    case = row.get("case") or {}
    return (row.get("model"), row.get("lengths"), row.get("pairs"), row.get("token_budget"),
            case.get("lm_head_chunk"), case.get("methods"))


def percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def table(rows: list[dict], naive: float | None) -> str:
    model, lengths, pairs, budget, chunk, methods = case_of(rows[0])
    title = f"{model}, {pairs} pairs, lengths {lengths}, token budget {budget:,}"
    if chunk:
        title += f", lm_head_chunk {chunk:,}"
    if methods and "trl" in methods.split(","):
        title += f", {' and '.join(methods.split(','))} in one process"
    lines = [f"**{title}**", "",
             "| method | pairs/s | vs naive | of peak, each prompt once | of peak, per sequence | peak memory | "
             "max abs diff vs exact |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} | | | | | |")
            continue
        speedup = f"{r['pairs_per_s'] / naive:.2f}×" if naive else ""
        memory = r.get("peak_mem_gib") if r.get("peak_mem_gib") is not None else r.get("peak_rss_gib")
        diff = r.get("max_abs_diff_vs_exact")
        lines.append(f"| {r['method']} | {r['pairs_per_s']:.2f} | {speedup} | "
                     f"{percent(r.get('fraction_of_peak_shared'))} | {percent(r.get('fraction_of_peak'))} | "
                     f"{'' if memory is None else f'{memory:.1f} GiB'} | {'' if diff is None else f'{diff:.2g}'} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    cases: dict[tuple, list[dict]] = {}
    naive: dict[tuple, float] = {}  # (model, lengths, pairs) -> the recipe's pairs/s
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    cases.setdefault(case_of(row), []).append(row)
                    if row["method"] == "naive" and "error" not in row:
                        naive.setdefault(case_of(row)[:3], row["pairs_per_s"])
    print("\n\n".join(table(rows, naive.get(key[:3])) for key, rows in cases.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
