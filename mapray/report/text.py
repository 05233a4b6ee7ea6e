"""`mapray show OUT`: the report's headline numbers as plain text, for a terminal on a cluster's head node."""

from __future__ import annotations


def headline(numbers: dict) -> str:
    run = numbers.get("run", {})
    counts, cut = run.get("counts", {}), numbers.get("cutoff")
    lines = [f"mapray report: {numbers.get('output')} (run {run.get('run_id')})",
             f"  {counts.get('input', 0):,} input pairs -> {numbers['scored']:,} scored, "
             f"{counts.get('rejected', 0):,} rejected, {numbers['selected']:,} selected"]
    for r in numbers.get("rejects", {}).get("by_code", [])[:5]:
        lines.append(f"  rejected {r['count']:>8,}  {r['code']} (stage {r['stage']}), e.g. {r['example']}")
    if not numbers["scored"]:
        return "\n".join(lines)
    where = f" (pair_id {cut['pair_id']})" if cut.get("pair_id") else ""
    lines.append(f"  selection: {cut['metric']}, alpha {cut['alpha']:g}, {cut['rule']} {cut['value']:g}; "
                 f"cut-off score {_g(cut['score'])}{where}")
    sweep = numbers["alpha_sweep"]
    lines.append(f"  alpha sweep ({sweep['metric']}): "
                 + ", ".join(f"{r['alpha']:g}: {r['selected']:,} kept, Jaccard {_g(r['jaccard_with_run'], 3)}"
                             for r in sweep["rows"]))
    lines.append("  overlap with the run's selection (Jaccard): "
                 + ", ".join(f"{r['metric']} {_g(r['jaccard_with_run'], 3)}" for r in numbers["overlap"]["rows"]))
    bias = numbers["length_bias"]
    lines.append("  mean tokens, pool -> selected: "
                 + ", ".join(f"{name.replace('_', ' ')} {_g(b['pool'], 4)} -> {_g(b['selected'], 4)}"
                             for name, b in bias.items()))
    audit = numbers["noise_audit"]
    lines.append(f"  noise audit: {audit['fraction']:.0%} of pairs swapped ({audit['swapped']:,}, seed "
                 f"{audit['seed']}); by chance {_g(audit['chance_share'], 3)} of them would be kept")
    lines.append(f"    {'metric':<22} {'swapped kept':>12} {'AUC':>7}")
    for r in audit["rows"]:
        lines.append(f"    {r['metric']:<22} {_g(r['share_swapped_selected'], 3):>12} {_g(r['auc'], 3):>7}")
    return "\n".join(lines)


def _g(value, digits: int = 6) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"
