"""OUT/report/index.html: one self-contained page, the figures inline as data: URIs and no external reference, so
it opens offline, from a bucket download or a cluster's head node. A content security policy forbids every
fetch; the only script writes, once the page has loaded, how many images decoded (`data-images-rendered`) and
any script error (`data-errors`) into the page itself, where a headless browser's DOM dump shows them.
"""

from __future__ import annotations

import base64
import html
import json

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1320px;color:#1f2328;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #d0d7de;padding:3px 8px;
text-align:right}th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#57606a;font-size:.9em}pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:.8em}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}.row>div{flex:0 1 auto;max-width:100%}"""
CHECK = """window.addEventListener('error', e => {
  document.body.dataset.errors = (document.body.dataset.errors || '') + e.message + ';'; });
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  images.forEach(i => { i.dataset.naturalWidth = i.naturalWidth; });
  document.body.dataset.images = images.length;
  document.body.dataset.imagesRendered = images.filter(i => i.complete && i.naturalWidth > 0).length;
});"""


def render(numbers: dict, images: dict[str, bytes]) -> str:
    run = numbers.get("run", {})
    body = [f"<h1>mapray report: <code>{_e(numbers.get('output', ''))}</code></h1>",
            f"<p class=note>run {_e(run.get('run_id'))}, finished {_e(run.get('finished_at'))}"
            + (f", reselected {_e(run['reselected_at'])}" if run.get("reselected_at") else "") + "</p>",
            _overview(numbers, run)]
    if numbers.get("scored"):
        body += _sections(numbers, images)
    body += [_run_details(run), f"<p class=note>{_e(_method(numbers))}</p>"]
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=Content-Security-Policy content=\"{CSP}\"><title>mapray report</title>"
            f"<style>{STYLE}</style><script>{CHECK}</script></head><body>{''.join(body)}</body></html>")


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode()
    return f'<p><img src="data:image/png;base64,{data}" alt="{_e(alt)}"></p>'


def _overview(numbers: dict, run: dict) -> str:
    counts = run.get("counts", {})
    cut = numbers.get("cutoff") or {}
    rows = [["input pairs", counts.get("input")], ["scored", numbers.get("scored")],
            ["rejected", counts.get("rejected")], ["selected", numbers.get("selected")]]
    rule = f"{cut.get('rule')} {_num(cut.get('value'))}" if cut else ""
    where = f" (pair_id {cut['pair_id']})" if cut.get("pair_id") else ""
    text = (f"<p>Selected by <b>{_e(cut.get('metric'))}</b>, alpha {_num(cut.get('alpha'))}, {_e(rule)}; cut-off "
            f"score {_num(cut.get('score'))}{_e(where)}.</p>") if cut else "<p>Nothing was scored.</p>"
    rejects = numbers.get("rejects", {})
    side = [text]
    if rejects.get("by_code"):
        side += ["<b>Rejects by reason and stage</b>",
                 _table(["reason", "stage", "rows", "for example"], [[r["code"], r["stage"], r["count"], r["example"]]
                                                                     for r in rejects["by_code"]])]
    if rejects.get("by_file"):
        side += ["<b>Rejects by input file</b>",
                 _table(["file", "rows"], [[r["file"], r["count"]] for r in rejects["by_file"]])]
    return _row("<h2>Counts</h2>" + _table(["", "pairs"], rows), "<h2>Selection</h2>" + "".join(side))


def _row(*cells: str) -> str:
    """Cells side by side where the window is wide enough, one under the other where not."""
    return '<div class=row>' + "".join(f"<div>{c}</div>" for c in cells if c) + "</div>"


def _sections(numbers: dict, images: dict[str, bytes]) -> list[str]:
    sweep, over, audit, bias = (numbers[k] for k in ("alpha_sweep", "overlap", "noise_audit", "length_bias"))
    out = ["<h2>Distributions</h2>", _image(images, "margins", "margin and score histograms"),
           _row("<h2>Explicit vs implicit margin</h2>" + _image(images, "scatter", "margin scatter"),
                f"<h2>Alpha sweep ({_e(sweep['metric'])}, {_e(sweep['rule'][0])} {_num(sweep['rule'][1])})</h2>"
                + _table(["alpha", "selected", "Jaccard with the run's selection"],
                         [[r["alpha"], r["selected"], r["jaccard_with_run"]] for r in sweep["rows"]])
                + _image(images, "alpha_sweep", "alpha sweep")),
           f"<h2>Overlap by metric ({_e(over['rule'][0])} {_num(over['rule'][1])} each)</h2>",
           _row(_table(["metric", "selected", "Jaccard with the run's selection"],
                       [[r["metric"], r["selected"], r["jaccard_with_run"]] for r in over["rows"]]),
                _image(images, "overlap", "Jaccard matrix")),
           "<h2>Length bias</h2>",
           _table(["mean over pairs", "pool", "selected"],
                  [[name.replace("_", " "), b["pool"], b["selected"]] for name, b in bias.items()]),
           _image(images, "lengths", "length histograms"),
           f"<h2>Noise audit ({audit['fraction']:.0%} of pairs swapped, seed {audit['seed']})</h2>",
           "<p class=note>Each swapped pair has chosen and rejected exchanged, so both margins change sign; every "
           "metric scores the pool again from the margins alone. A metric that pushes label noise out keeps few "
           "swapped pairs and ranks them low (AUC near 1); 0.5 is blind to the swap. The paper form "
           "<code>map</code> and <code>implicit_margin_small</code> read |m_ex| and |m_im| only: a swap cannot "
           "change their scores, so their numbers here are those of a random subset. By chance a selection keeps "
           f"{_num(audit['chance_share'])} of any subset.</p>",
           _row(_table(["metric", "swapped kept", "share kept", "AUC (swapped lower)", "AUC error bound"],
                       [[r["metric"], r["swapped_selected"], r["share_swapped_selected"], r["auc"],
                         r["auc_error_bound"]] for r in audit["rows"]]),
                _image(images, "noise_audit", "noise audit"))]
    return out + _reward_audit(numbers.get("reward_audit")) + _by_group(numbers, images)


def _reward_audit(audit: dict | None) -> list[str]:
    """The reward-bias audit: the selection again with a known bias added to each margin, and the models'
    agreement (`mapray.report.reward_audit`)."""
    if not audit:
        return []
    kinds = "; ".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in audit["biases"].items())
    out = ["<h2>Reward-bias audit</h2>",
           "<p class=note>The selection made again (the run's metric, alpha and size) with a known bias added to "
           f"the rewards, margin + lambda x (chosen - rejected) of the bias's measure ({kinds}); lambda is the "
           "fraction times the margin's spread per unit of the measure's. A selection that moves little with lambda "
           "does not follow the bias."
           + "".join(f" The {_e(k)} bias is left out: its difference is the same for every pair."
                     for k in audit.get("skipped_biases", [])) + "</p>",
           _table(["margin", "bias", "fraction", "lambda", "selected", "Jaccard with the run's selection"],
                  [[r["margin"], r["bias"], r["fraction"], r["lambda"], r["selected"], r["jaccard_with_run"]]
                   for r in audit["rows"] if r["metric"] == audit["rows"][0]["metric"]])]
    strongest = max(r["fraction"] for r in audit["rows"])
    metrics = list(dict.fromkeys(r["metric"] for r in audit["rows"]))
    cells: dict = {}
    for r in audit["rows"]:
        if r["bias"] != "none" and r["fraction"] == strongest:
            cells.setdefault((r["margin"], r["bias"]), {})[r["metric"]] = r["jaccard_with_unbiased"]
    out += [f"<p class=note>Every metric that reads the explicit margin, at fraction {_num(strongest)}: Jaccard of "
            "its selection with the bias and without it.</p>",
            _table(["margin", "bias", *metrics], [[m, b, *(row.get(k) for k in metrics)]
                                                  for (m, b), row in cells.items()])]
    agreement = audit.get("agreement")
    if agreement:
        models = agreement["models"]
        out += ["<h3>Agreement of the reward models</h3>",
                _table(["model", *(f"correlation with {m}" for m in models), *(f"opposite sign to {m}" for m in models),
                        *(f"selection Jaccard with {m}" for m in models)],
                       [[m, *agreement["correlation"][i], *agreement["opposite_sign_share"][i],
                         *agreement["selection_jaccard"][i]] for i, m in enumerate(models)])]
    return out


def _by_group(numbers: dict, images: dict[str, bytes]) -> list[str]:
    by = numbers.get("by")
    if not by:
        if len(numbers.get("rejects", {}).get("by_file", [])) > 1:
            return ["<p class=note>scored/ carries no input-file column: <code>mapray report OUT --by COLUMN</code> "
                    "breaks the pool down by one of the input's own columns.</p>"]
        return []
    more = f"<p class=note>{by['groups_not_shown']:,} more groups not shown.</p>" if by["groups_not_shown"] else ""
    return [f"<h2>By {_e(by['column'])}</h2>",
            _table(["value", "scored", "selected", "share selected", "mean m_ex", "mean |m_im|",
                    "mean chosen tokens", "mean rejected tokens"],
                   [[g["value"], g["scored"], g["selected"], g["share_selected"], g["mean_explicit_margin"],
                     g["mean_abs_implicit_margin"], g["mean_chosen_tokens"], g["mean_rejected_tokens"]]
                    for g in by["groups"]]) + more,
            _image(images, "by_group", "selection by group")]


def _run_details(run: dict) -> str:
    models = [[key, m.get("configured"), m.get("engine"), m.get("dtype"), m.get("sha256")]
              for key, m in (run.get("models") or {}).items()]
    out = ["<h2>Run</h2>"]
    if models:
        out.append(_table(["model", "path", "engine", "dtype", "SHA-256"], models))
    config = json.dumps(run.get("config", {}), indent=1, default=str)
    return "".join(out) + f"<details><summary>config</summary><pre>{_e(config)}</pre></details>"


def _method(numbers: dict) -> str:
    s = numbers.get("settings", {})
    took = numbers.get("timings", {})
    return (f"Computed from scored/ with Ray Data passes (no model runs): scores binned on {s.get('rank_bins')} "
            f"quantile bins from a sample of up to {s.get('sample_rows'):,} pairs, which also draws the scatter; "
            f"cut-offs exact (score, then the smaller pair_id). Compute {took.get('compute_s', 0):.1f} s, "
            f"figures {took.get('figures_s', 0):.1f} s.")
