"""The output folder's README.md: a dataset card, so `datasets.load_dataset(OUT)` and the Hub read the output
without extra code, and a reader of the folder sees how its rows were made.

Its YAML front matter follows the Hub's manual configuration (`configs:` with `data_files` per split): the
default config has the splits `scored` and `selected` (the same columns), and `rejects`, whose columns differ,
is a config of its own. The text repeats what manifest.json holds: counts, the selection, models, config.

An empty selected/ is left out of the default config: `datasets` (5.2 and before, huggingface/datasets#8401)
cannot load a 0-row split, and one such split makes the whole config fail, scored included. An empty folder
still holds a 0-row file with its columns, which pyarrow and `load_dataset(..., streaming=True)` read.
"""

from __future__ import annotations

import json

import yaml

TAGS = ["mapray", "dpo", "preference"]


def configs(counts: dict | None) -> list[dict]:
    """The `configs:` entries; `selected` only when it has rows (see above)."""
    splits = ["scored"] if (counts or {}).get("selected") == 0 else ["scored", "selected"]
    return [{"config_name": "default", "data_files": [{"split": s, "path": f"{s}/*.parquet"} for s in splits]},
            {"config_name": "rejects", "data_files": [{"split": "rejects", "path": "rejects/*.parquet"}]}]


def render(manifest: dict) -> str:
    """The card for a published output, from its manifest (sections whose keys the manifest lacks are left out)."""
    manifest = json.loads(json.dumps(manifest, default=str))  # plain JSON types, as manifest.json holds them
    front = yaml.safe_dump({"configs": configs(manifest.get("counts")), "tags": TAGS}, sort_keys=False).rstrip()
    parts = [f"---\n{front}\n---", _intro(manifest), _counts(manifest.get("counts")),
             _selection(manifest.get("selection"), manifest.get("pool_moments"), manifest.get("reward_combination")),
             _models(manifest.get("models")),
             _config(manifest.get("config"))]
    return "\n\n".join(p for p in parts if p) + "\n"


def _intro(manifest: dict) -> str:
    return "\n".join([
        f"# mapray output `{manifest.get('run_id', '?')}`",
        "",
        f"Preference pairs scored by mapray {_version(manifest)}and selected by alignment potential (MAP, Huang et "
        "al., ICML 2025): pairs the reward model separates clearly but the policy does not yet.",
        "",
        "```python",
        "from datasets import load_dataset",
        "OUT = \"path/to/this/folder\"  # or its Hub repo id once uploaded",
        "pairs = load_dataset(OUT)  # splits: scored (every scored pair), selected (the kept ones)",
        "rejects = load_dataset(OUT, \"rejects\")  # rows set aside, each with its reason",
        "```",
        "",
        "`pairs.push_to_hub(REPO)` uploads scored and selected; to keep this card and the rejects config, upload "
        "the folder itself: `HfApi().upload_folder(repo_id=REPO, folder_path=OUT, repo_type=\"dataset\", "
        "ignore_patterns=[\"_staging/*\"])`.",
        "",
        "`manifest.json` holds everything below and more (library versions, timings); read it first and check "
        "its `run_id` again after reading the folders.",
        *_empty_note(manifest.get("counts") or {}),
    ])


def _empty_note(counts: dict) -> list[str]:
    folders = {"scored": "scored", "selected": "selected", "rejected": "rejects"}
    empty = [folder for key, folder in folders.items() if counts.get(key) == 0]
    if not empty:
        return []
    how = {"scored": "scored loads with `load_dataset(OUT, streaming=True)`",
           "selected": "selected is left out of the default config",
           "rejects": 'rejects loads with `load_dataset(OUT, "rejects", streaming=True)`'}
    return ["", f"Empty here: {', '.join(f'{n}/' for n in empty)} (0-row Parquet with the columns, which pyarrow "
                "reads). `datasets` cannot load a 0-row split yet (huggingface/datasets#8401): "
                + "; ".join(how[n] for n in empty) + "."]


def _version(manifest: dict) -> str:
    version = (manifest.get("libraries") or {}).get("mapray")
    return f"{version} " if version else ""


def _counts(counts: dict | None) -> str:
    if not counts:
        return ""
    rows = [f"| {name} | {counts[name]} |" for name in ("input", "scored", "rejected", "selected") if name in counts]
    rows += [f"| rejected, {code} (e.g. {entry['example']}) | {entry['count']} |"
             for code, entry in counts.get("rejected_by_code", {}).items()]
    return "\n".join(["## Counts", "", "| | rows |", "|---|---|", *rows])


def _selection(sel: dict | None, moments: dict | None, combination: dict | None = None) -> str:
    if not sel:
        return ""
    rule = sel["rule"]
    how = _rule_text(rule, sel[rule], bool(sel.get("by")))
    lines = ["## Selection", "", f"- metric: `{sel['metric']}`, alpha {sel['alpha']}",
             f"- rule: {rule} ({how}): {sel['selected']} rows selected"]
    if sel.get("by"):
        lines += _groups(sel)
    if sel.get("cutoff"):
        lines.append(f"- cut-off: score {sel['cutoff']['score']!r} (pair_id `{sel['cutoff']['pair_id']}`); "
                     "ties at the cut-off go to the smaller pair_id")
    if "seed" in sel:
        lines.append(f"- seed: {sel['seed']}")
    for name, m in (moments or {}).items():
        lines.append(f"- pool {name}: mean {m['mean']!r}, population std {m['std']!r} over {m['count']} rows")
    if combination:
        how = {"mean": "the weighted mean of their margins", "mean_z": "the weighted mean of their pool-z-scored "
               "margins"}[combination["rule"]]
        weights = ", ".join(f"`{n}` {m['weight']!r}" for n, m in combination["models"].items())
        lines.append(f"- explicit margin: {how}, over {len(combination['models'])} reward models (weights: "
                     f"{weights}); each model's rewards and margin are columns `reward_<name>_*`")
    return "\n".join(lines)


def _rule_text(rule: str, value, grouped: bool) -> str:
    if rule == "ratio":
        return f"the top {value} of {'each group' if grouped else 'the scored pool'}"
    of = " of each group" if grouped else ""
    return f"the top {value} rows{of}" if rule == "top_k" else f"every row{of} whose score exceeds {value}"


def _groups(sel: dict) -> list[str]:
    """Per-group selection: the groups' rules, pools, rows selected and cut-offs."""
    zscore = "each group's own" if sel["zscore"] == "group" else "the whole pool's"
    lines = [f"- per group of column `{sel['by']}` ({len(sel['groups'])} groups; map_z from {zscore} moments):", "",
             "| group | rule | pool | selected | cut-off score |", "|---|---|---|---|---|"]
    for g in sel["groups"]:
        short = f" (short by {g['short']}: every row)" if g.get("short") else ""
        cutoff = repr(g["cutoff"]["score"]) if g.get("cutoff") else "-"
        value = "null" if g["value"] is None else g["value"]
        lines.append(f"| `{value}` | {g['rule']} {g[g['rule']]}{short} | {g['pool']} | {g['selected']} | {cutoff} |")
    return lines + [""]


def _models(models: dict | None) -> str:
    if not models:
        return ""
    rows = [f"| {role} | `{m.get('configured')}` | {m.get('engine')} | {m.get('dtype')} | `{m.get('sha256')}` |"
            for role, m in models.items()]
    return "\n".join(["## Models", "", "| role | path | engine | dtype | sha256 |", "|---|---|---|---|---|", *rows])


def _config(config: dict | None) -> str:
    if not config:
        return ""
    return "\n".join(["## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"])
