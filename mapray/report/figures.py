"""The report's figures as PNG bytes, drawn with matplotlib from the numbers and the bounded sample.

Why matplotlib: it writes static PNGs with no browser, server or JavaScript, so the page stays one self-contained
file that opens offline and on a cluster's head node; it is the most widely kept Python plotting library (3.x is
API-stable; the object API used here, `Figure` without pyplot, keeps no global state and needs no display).
Interactive libraries (plotly, bokeh, altair) would embed megabytes of JavaScript per page or fetch it from a
CDN, which "no network needed" rules out.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from mapray import columns as C

POOL, SELECTED, MARK = "#9aa5b1", "#1f6feb", "#d1242f"
LABELS = {C.MAP_Z: "map_z", C.MAP: "map (paper form)", C.MAP_UNREG: "map_unreg"}


def render(numbers: dict, sample) -> dict[str, bytes]:
    """Every figure the page shows, by name (also its PNG file name)."""
    if not numbers.get("scored"):
        return {}
    units = _units(numbers.get("run", {}).get("config", {}).get("metric", {}))
    out = {"margins": margins(numbers, units), "scatter": scatter(numbers, sample, units),
           "alpha_sweep": alpha_sweep(numbers), "overlap": overlap(numbers), "lengths": lengths(numbers),
           "noise_audit": noise_audit(numbers)}
    if numbers.get("by"):
        out["by_group"] = by_group(numbers)
    return out


def _units(metric: dict) -> dict[str, str]:
    beta = metric.get("beta")
    implicit = metric.get("implicit", "simpo")
    beta = beta if beta is not None else (2.0 if implicit == "simpo" else 0.1)
    per = "nats/token" if implicit == "simpo" else "nats"
    return {"explicit": "reward units", "implicit": f"{beta:g} x {per}, {implicit}"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _hist(ax, dist: dict, xlabel: str, title: str) -> None:
    edges = np.asarray(dist["edges"])
    ax.stairs(dist["pool"], edges, fill=True, color=POOL, label="pool")
    ax.stairs(dist["selected"], edges, fill=True, color=SELECTED, alpha=0.8, label="selected")
    ax.set(title=title, xlabel=xlabel, ylabel="pairs")
    ax.legend(loc="upper right", fontsize=8)


def margins(numbers: dict, units: dict) -> bytes:
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    d, cut = numbers["distributions"], numbers["cutoff"]
    _hist(axes[0], d["explicit_margin"], f"m_ex = r(y_w) - r(y_l) [{units['explicit']}]", "Explicit margin")
    _hist(axes[1], d["abs_implicit_margin"], f"|m_im| [{units['implicit']}]", "|Implicit margin|")
    _hist(axes[2], d["selection_score"], f"{cut['metric']} (alpha {cut['alpha']:g}) [score units]",
          f"Selection score: {cut['metric']}")
    if cut["score"] is not None:
        axes[2].axvline(cut["score"], color=MARK, linestyle="--", label=f"cut-off {cut['score']:.3g}")
        axes[2].legend(loc="upper right", fontsize=8)
    fig.suptitle("Distributions over the scored pool (values beyond the sample's range fall in the end bins)")
    return _png(fig)


def scatter(numbers: dict, sample, units: dict) -> bytes:
    fig = Figure(figsize=(6, 4.6), layout="constrained")
    ax = fig.subplots()
    m_ex = sample.column(C.EXPLICIT_MARGIN).to_numpy(zero_copy_only=False)
    m_im = sample.column(C.IMPLICIT_MARGIN).to_numpy(zero_copy_only=False)
    chosen = sample.column(C.SELECTED).to_numpy(zero_copy_only=False).astype(bool)
    size = float(np.clip(4000 / max(len(m_ex), 1), 3, 30))  # visible dots for a small pool, no blot for a large
    ax.scatter(m_ex[~chosen], m_im[~chosen], s=size, color=POOL, alpha=0.6, label="not selected", linewidths=0)
    ax.scatter(m_ex[chosen], m_im[chosen], s=size, color=SELECTED, alpha=0.8, label="selected", linewidths=0)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set(xlabel=f"explicit margin m_ex [{units['explicit']}]", ylabel=f"implicit margin m_im [{units['implicit']}]",
           title=f"Explicit vs implicit margin (sample of {len(m_ex):,} of {numbers['scored']:,} pairs)")
    ax.legend(loc="best", fontsize=8, markerscale=max(1.0, 12 / size))
    return _png(fig)


def alpha_sweep(numbers: dict) -> bytes:
    sweep = numbers["alpha_sweep"]
    alphas = [r["alpha"] for r in sweep["rows"]]
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(alphas, [r["jaccard_with_run"] for r in sweep["rows"]], "o-", color=SELECTED, label="Jaccard with run")
    ax.axvline(numbers["cutoff"]["alpha"], color=MARK, linestyle="--", label="run's alpha")
    ax.set(xlabel="alpha (weight of the implicit term, unitless)", ylabel="Jaccard index with the run's selection",
           ylim=(-0.02, 1.02), title=f"Alpha sweep: {sweep['metric']}, {sweep['rule'][0]} {sweep['rule'][1]:g}")
    sizes = ax.twinx()
    counts = [r["selected"] for r in sweep["rows"]]
    sizes.plot(alphas, counts, "s:", color=POOL, label="selected pairs")
    sizes.set(ylabel="selected pairs", ylim=(0, 1.15 * max(max(counts), 1)))
    lines = ax.get_legend_handles_labels()
    more = sizes.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    return _png(fig)


def overlap(numbers: dict) -> bytes:
    names, matrix = numbers["overlap"]["metrics"], np.array(numbers["overlap"]["jaccard"], dtype=float)
    fig = Figure(figsize=(8.5, 7), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="Jaccard index (|A and B| / |A or B|)")
    rule = numbers["overlap"]["rule"]
    ax.set(title=f"Overlap of the selections by metric ({rule[0]} {rule[1]:g} each)", xlabel="metric",
           ylabel="metric")
    return _png(fig)


def lengths(numbers: dict) -> bytes:
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    d, bias = numbers["distributions"], numbers["length_bias"]
    for ax, name, title in zip(axes, ("chosen_tokens", "rejected_tokens", "length_difference"),
                               ("Chosen response", "Rejected response", "Chosen - rejected")):
        edges = np.asarray(d[name]["edges"])
        widths = np.diff(edges)
        for key, color, label in (("pool", POOL, "pool"), ("selected", SELECTED, "selected")):
            counts = np.asarray(d[name][key], dtype=float)
            density = counts / (counts.sum() * widths) if counts.sum() else counts
            ax.stairs(density, edges, color=color, linewidth=1.5, label=label)
            if bias[name][key] is not None:
                ax.axvline(bias[name][key], color=color, linestyle="--", label=f"{label} mean {bias[name][key]:.1f}")
        ax.set(title=title, xlabel="response tokens scored [tokens]", ylabel="share of pairs per token")
        ax.legend(fontsize=7)
    fig.suptitle("Length bias: response lengths, pool vs selected")
    return _png(fig)


def noise_audit(numbers: dict) -> bytes:
    audit = numbers["noise_audit"]
    rows = audit["rows"]
    names = [r["metric"] for r in rows]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    share_ax, auc_ax = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))
    share_ax.barh(y, [r["share_swapped_selected"] or 0 for r in rows], color=SELECTED, label="swapped pairs kept")
    share_ax.axvline(audit["chance_share"], color=MARK, linestyle="--", label="by chance (kept / pool)")
    share_ax.set(yticks=y, yticklabels=names, xlim=(0, 1), xlabel="share of swapped pairs selected (0-1)",
                 title="Swapped pairs that would be selected (lower is better)")
    share_ax.invert_yaxis()
    share_ax.legend(fontsize=8, loc="lower right")
    auc_ax.barh(y, [r["auc"] or 0 for r in rows], color=POOL, label="AUC")
    auc_ax.axvline(0.5, color=MARK, linestyle="--", label="0.5: blind to the swap")
    auc_ax.set(xlim=(0, 1), xlabel="AUC of ranking swapped pairs below the others (0-1)",
               title="Ranking swapped pairs low (higher is better)")
    auc_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Noise audit: {audit['fraction']:.0%} of pairs swapped ({audit['swapped']:,} pairs, "
                 f"seed {audit['seed']}), scored again from the margins")
    return _png(fig)


def by_group(numbers: dict) -> bytes:
    by = numbers["by"]
    groups = by["groups"][:20]
    fig = Figure(figsize=(8, 0.5 + 0.35 * max(len(groups), 3)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(groups))
    ax.barh(y, [g["share_selected"] for g in groups], color=SELECTED, label="share selected")
    ax.axvline(numbers["selected"] / numbers["scored"], color=MARK, linestyle="--", label="whole pool")
    ax.set(yticks=y, yticklabels=[f"{g['value'][:30]} ({g['scored']:,})" for g in groups], xlim=(0, 1),
           xlabel="share of the group's pairs selected (0-1)", title=f"Selection by {by['column']} (pairs scored)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    return _png(fig)
