"""What changed between two runs' selections (`mapray diff OLD NEW`, a nightly rescore's `diff:`): the pairs
joined on pair_id with Ray Data, counted, and each pair that entered or left the selection attributed to what
moved. Nothing of the pools comes to the driver: one join, materialized, then one pass that counts and one that
writes the changed pairs.

- pairs: only in OLD's pool, only in NEW's, in both (a pool is the rows of scored/: rows set aside are in no pool);
- selected: in OLD, in NEW, in both; entered (selected in NEW, not in OLD: a new pair or one that rose), left
  (selected in OLD, not in NEW);
- churn: max(entered / selected in NEW, left / selected in OLD): the larger share of either selection that is
  not in the other. With a fixed ratio over an unchanged pool, entered = left and churn is the share of the
  selection that was replaced; a pool that grew or shrank shows on the side that changed;
- moved: for the pairs in both pools, each input of the selection (explicit margin, implicit margin, each reward
  model's margin where both runs have it): how many moved by more than the tolerance, mean and mean absolute
  change, the largest, and the correlation of old and new values;
- attribution of each entered / left pair: `new_pair` / `removed_pair` (in one pool only), else which of its
  margins moved: `explicit_margin`, `implicit_margin`, `both_margins`, or `cutoff` (neither: the pool or the rule
  moved around it); and per reward model, how many of them had that model's margin move. Beside the counts,
  what changed between the runs: the models whose content hash differs (by role) and the selection settings.

Written as `diff.json` (the numbers) and `diff/` (one row per entered or left pair: pair_id, change, cause, the
margins old and new) into NEW's output, or wherever the caller says.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mapray import columns as C
from mapray.config import DiffConfig, RayConfig
from mapray.errors import ChurnExceeded
from mapray.outputs import DIFF, OutputLayout, read_json, read_manifest, write_json
from mapray.reductions import BATCH_ROWS, reduce

INPUTS = [C.EXPLICIT_MARGIN, C.IMPLICIT_MARGIN]
CAUSES = ("new_pair", "removed_pair", "explicit_margin", "implicit_margin", "both_margins", "cutoff")
DEFAULT_TOLERANCE = 1e-6  # relative to max(1, |value|): a float's round trip through Parquet moves nothing
CHANGE, CAUSE = "change", "cause"
# the selection settings that move a cut-off without moving a margin
SETTINGS = (("selection",), ("metric", "alpha"), ("metric", "beta"), ("metric", "implicit"), ("reward", "combine"))


@dataclass(frozen=True)
class Run:
    """One side of a diff: its output URI, its scored/ folder (a published or a staged one) and its manifest."""

    output: str
    scored: str
    manifest: dict


def diff(old: str, new: str, max_churn: float | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """`mapray diff OLD NEW`: the diff of two published outputs, written as NEW/diff.json and NEW/diff/; returns
    the numbers (`max_churn` is recorded there; `check_churn` says whether the churn is above it)."""
    DiffConfig(max_churn=max_churn, tolerance=tolerance)  # checked as a config's diff: section is
    runs = [published(uri) for uri in (old, new)]
    from mapray.runtime import init_ray

    init_ray(RayConfig(), [])
    layout = OutputLayout(new)
    layout.remove(layout.final(DIFF))  # an earlier diff's pairs
    numbers = dict(compare(*runs, tolerance, write_to=layout.final(DIFF)), max_churn=max_churn)
    write_json(f"{layout.uri}/{DIFF}.json", numbers)
    return numbers


def against_previous(cfg, layout: OutputLayout, manifest: dict) -> dict | None:
    """A run's diff (`cfg.diff`) of its staged results against the previous run's published output, before they
    are published: the changed pairs staged as diff/, the numbers returned (None, and the manifest says so, when
    there is no previous output yet: a first run). A churn above `diff.max_churn` raises `ChurnExceeded`: the
    results stay staged, unpublished, with diff.json beside them, and the previous output stays as it was."""
    previous = (cfg.diff.previous or cfg.output).rstrip("/")
    before = read_json(f"{previous}/manifest.json")
    if before is None:
        manifest["diff"] = {"previous": None, "note": f"no published output at {previous} to compare with"}
        return None
    staged = Run(cfg.output, layout.staged("scored"), manifest)
    layout.remove(layout.staged(DIFF))
    numbers = dict(compare(Run(previous, f"{previous}/scored", before), staged, cfg.diff.tolerance,
                           write_to=layout.staged(DIFF)), max_churn=cfg.diff.max_churn)
    manifest["diff"] = {"previous": {"output": previous, "run_id": before.get("run_id")}, "churn": numbers["churn"],
                        "max_churn": cfg.diff.max_churn, "file": f"{DIFF}.json"}
    staged_json = layout.staged(f"{DIFF}.json")
    write_json(staged_json, numbers)
    check_churn(numbers, staged_json, "diff.max_churn", f"; not published: {cfg.output} still holds run "
                f"{before.get('run_id')}, the new results are staged in {layout.staged('')}")
    return numbers


def published(uri: str) -> Run:
    """A finished output as one side of a diff."""
    manifest = read_manifest(uri)
    return Run(uri.rstrip("/"), f"{uri.rstrip('/')}/scored", manifest)


def check_churn(numbers: dict, where: str, key: str, then: str = "") -> None:
    """`ChurnExceeded` (one line: the churn, the bound `key`, the counts, the diff.json at `where`, and `then`)
    when the churn is above the numbers' `max_churn`."""
    bound = numbers.get("max_churn")
    if bound is None or numbers["churn"] <= bound:
        return
    s = numbers["selected"]
    raise ChurnExceeded(f"the selection changed more than {key} {bound:g} allows: churn {numbers['churn']:.3f} "
                        f"({s['entered']} of {s['new']} selected pairs entered, {s['left']} of {s['old']} left since "
                        f"run {numbers['old']['run_id']}; {where}){then}")


def compare(old: Run, new: Run, tolerance: float = DEFAULT_TOLERANCE, write_to: str | None = None) -> dict:
    """The diff of two runs (the module docstring); with `write_to`, the changed pairs are written there as
    Parquet (the caller writes diff.json)."""
    import ray.data

    inputs = INPUTS + sorted(set(_model_margins(old)) & set(_model_margins(new)))
    sides = {}
    for tag, run in (("old", old), ("new", new)):
        columns = [C.PAIR_ID, C.SELECTED, *inputs]
        sides[tag] = ray.data.read_parquet(run.scored).select_columns(columns).map_batches(
            partial(_tagged, tag=tag), batch_format="pyarrow")
    joined = sides["old"].join(sides["new"], join_type="full_outer", num_partitions=_partitions(),
                               on=(C.PAIR_ID,)).materialize()
    tally = reduce(joined, _tally, inputs=inputs, tolerance=tolerance) or _tally(_empty(inputs), inputs, tolerance)
    if write_to is not None:
        changed = partial(_changed_pairs, inputs=inputs, tolerance=tolerance)
        if tally["entered"] + tally["left"]:
            joined.map_batches(changed, batch_format="pyarrow", batch_size=BATCH_ROWS).write_parquet(write_to)
        else:  # Ray writes no file for no rows: a reader still gets the folder's columns
            fs, folder = fsspec.core.url_to_fs(write_to)
            fs.makedirs(folder, exist_ok=True)
            with fs.open(f"{folder}/empty.parquet", "wb") as f:
                pq.write_table(changed(_empty(inputs)), f)
    return _numbers(old, new, tally, inputs, tolerance)


def churn(numbers: dict) -> float:
    """The larger share of either selection that is not in the other (the module docstring)."""
    sel = numbers["selected"]
    shares = [sel["entered"] / sel["new"] if sel["new"] else 0.0, sel["left"] / sel["old"] if sel["old"] else 0.0]
    return max(shares)


def summary(numbers: dict) -> str:
    """A few lines for the terminal."""
    p, s = numbers["pairs"], numbers["selected"]
    lines = [f"mapray diff: {numbers['old']['run_id']} -> {numbers['new']['run_id']}",
             f"  pairs: {p['in_both']} in both, {p['only_new']} new, {p['only_old']} gone",
             f"  selected: {s['old']} -> {s['new']}, {s['both']} in both, {s['entered']} entered, {s['left']} left; "
             f"churn {numbers['churn']:.3f}" + (f" (bound {numbers['max_churn']:g})" if numbers.get("max_churn")
                                                 is not None else "")]
    for change in ("entered", "left"):
        causes = ", ".join(f"{n} {cause}" for cause, n in numbers["attribution"][change].items() if n)
        if causes:
            lines.append(f"  {change}: {causes}")
    moved = ", ".join(f"{name} {m['moved']}" for name, m in numbers["moved"].items())
    lines.append(f"  moved (of {p['in_both']} in both): {moved}")
    changed = numbers["changed"]
    if changed["models"] or changed["settings"]:
        lines.append("  changed: " + ", ".join([f"{role} model" for role in changed["models"]]
                                              + list(changed["settings"])))
    return "\n".join(lines)


def _tagged(table: pa.Table, tag: str) -> pa.Table:
    """A side's columns renamed `<name>_<tag>` (pair_id kept: the join key), with a flag that the pair is here."""
    renamed = table.rename_columns([c if c == C.PAIR_ID else f"{c}_{tag}" for c in table.column_names])
    return renamed.append_column(f"in_{tag}", pa.array(np.ones(table.num_rows, dtype=bool)))


def _partitions() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _model_margins(run: Run) -> list[str]:
    combination = run.manifest.get("reward_combination") or {}
    return [C.reward_model_columns(name)[2] for name in combination.get("models", {})]


def _empty(inputs: list[str]) -> pa.Table:
    fields = [(C.PAIR_ID, pa.string())]
    for tag in ("old", "new"):
        fields += [(f"{C.SELECTED}_{tag}", pa.bool_()), *[(f"{c}_{tag}", pa.float64()) for c in inputs],
                   (f"in_{tag}", pa.bool_())]
    return pa.schema(fields).empty_table()


def _flag(table: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(table.column(name), False).to_numpy(zero_copy_only=False).astype(bool)


def _values(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _moved(table: pa.Table, name: str, tolerance: float) -> np.ndarray:
    old, new = _values(table, f"{name}_old"), _values(table, f"{name}_new")
    with np.errstate(invalid="ignore"):
        return ~(np.abs(new - old) <= tolerance * np.maximum(1.0, np.abs(old)))  # NaN (one side only): moved


def _causes(table: pa.Table, tolerance: float) -> np.ndarray:
    """Each row's cause, were it to enter or leave (`CAUSES`)."""
    in_old, in_new = _flag(table, "in_old"), _flag(table, "in_new")
    ex, im = (_moved(table, name, tolerance) for name in INPUTS)
    return np.select([~in_old, ~in_new, ex & im, ex, im], ["new_pair", "removed_pair", "both_margins",
                                                          "explicit_margin", "implicit_margin"], "cutoff")


def _changes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    old, new = _flag(table, f"{C.SELECTED}_old"), _flag(table, f"{C.SELECTED}_new")
    return new & ~old, old & ~new


def _tally(table: pa.Table, inputs: list[str], tolerance: float) -> dict:
    """A block's counts, its movement sums per input (pairs in both pools) and its attribution counts."""
    in_old, in_new = _flag(table, "in_old"), _flag(table, "in_new")
    sel_old, sel_new = _flag(table, f"{C.SELECTED}_old"), _flag(table, f"{C.SELECTED}_new")
    entered, left = _changes(table)
    both = in_old & in_new
    causes = _causes(table, tolerance)
    out = {"only_old": int((in_old & ~in_new).sum()), "only_new": int((in_new & ~in_old).sum()),
           "in_both": int(both.sum()), "selected_old": int(sel_old.sum()), "selected_new": int(sel_new.sum()),
           "selected_both": int((sel_old & sel_new).sum()), "entered": int(entered.sum()), "left": int(left.sum()),
           "moved": {}, "attribution": {}, "by_model": {}}
    for change, rows in (("entered", entered), ("left", left)):
        out["attribution"][change] = np.array([int((causes[rows] == cause).sum()) for cause in CAUSES])
    mine = table.filter(pa.array(both))
    for name in inputs:
        old, new = _values(mine, f"{name}_old"), _values(mine, f"{name}_new")
        moved = _moved(mine, name, tolerance)
        delta = new - old
        out["moved"][name] = Movement(np.array([old.size, moved.sum(), delta.sum(), np.abs(delta).sum(), old.sum(),
                                                new.sum(), (old * old).sum(), (new * new).sum(), (old * new).sum()]),
                                      float(np.abs(delta).max()) if delta.size else 0.0)
        if name not in INPUTS:  # a reward model's margin: the entered / left pairs it moved for
            model_moved = _moved(table, name, tolerance) & in_old & in_new
            out["by_model"][name] = np.array([int((model_moved & entered).sum()), int((model_moved & left).sum())])
    return out


@dataclass(frozen=True)
class Movement:
    """Sums of one input's old and new values over pairs in both pools (n, moved, sum of change, sum of |change|,
    sums for the correlation) and the largest |change|: merge by adding, and by max."""

    sums: np.ndarray
    largest: float

    def merge(self, other: Movement) -> Movement:
        return Movement(self.sums + other.sums, max(self.largest, other.largest))

    def to_dict(self) -> dict:
        n, moved, d, ad, x, y, xx, yy, xy = self.sums
        if not n:
            return {"pairs": 0, "moved": 0}
        cov, vx, vy = xy / n - x * y / n**2, xx / n - (x / n) ** 2, yy / n - (y / n) ** 2
        corr = float(cov / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else None
        return {"pairs": int(n), "moved": int(moved), "mean_change": d / n, "mean_abs_change": ad / n,
                "max_abs_change": self.largest, "correlation": corr}


def _changed_pairs(table: pa.Table, inputs: list[str], tolerance: float) -> pa.Table:
    """The block's pairs that entered or left, with the cause and their margins old and new."""
    entered, left = _changes(table)
    rows = np.flatnonzero(entered | left)
    picked = table.take(pa.array(rows, pa.int64()))
    columns = {C.PAIR_ID: picked.column(C.PAIR_ID),
               CHANGE: pa.array(np.where(entered[rows], "entered", "left"), pa.string()),
               CAUSE: pa.array(_causes(table, tolerance)[rows], pa.string())}
    for name in inputs:
        for tag in ("old", "new"):
            columns[f"{name}_{tag}"] = picked.column(f"{name}_{tag}")
    return pa.table(columns)


def _numbers(old: Run, new: Run, tally: dict, inputs: list[str], tolerance: float) -> dict:
    numbers = {
        "old": _side(old), "new": _side(new), "tolerance": tolerance,
        "pairs": {k: tally[k] for k in ("only_old", "only_new", "in_both")},
        "selected": {"old": tally["selected_old"], "new": tally["selected_new"], "both": tally["selected_both"],
                     "entered": tally["entered"], "left": tally["left"]},
        "moved": {name: tally["moved"][name].to_dict() for name in inputs},
        "attribution": {change: dict(zip(CAUSES, map(int, tally["attribution"][change])))
                        for change in ("entered", "left")},
        "by_reward_model": {name: {"entered": int(v[0]), "left": int(v[1])} for name, v in tally["by_model"].items()},
        "changed": {"models": _changed_models(old.manifest, new.manifest),
                    "settings": _changed_settings(old.manifest["config"], new.manifest["config"])},
    }
    numbers["churn"] = churn(numbers)
    return numbers


def _side(run: Run) -> dict:
    m = run.manifest
    return {"output": run.output, "run_id": m.get("run_id"), "finished_at": m.get("reselected_at") or
            m.get("finished_at"), "models": {role: model.get("sha256") for role, model in m.get("models", {}).items()}}


def _changed_models(old: dict, new: dict) -> dict:
    """Roles whose model content differs (or is in one run only): role -> {old, new} (sha256 and path)."""
    a, b = old.get("models", {}), new.get("models", {})
    out = {}
    for role in sorted(set(a) | set(b)):
        before, after = a.get(role, {}), b.get(role, {})
        if before.get("sha256") != after.get("sha256"):
            out[role] = {"old": {k: before.get(k) for k in ("configured", "sha256")},
                         "new": {k: after.get(k) for k in ("configured", "sha256")}}
    return out


def _changed_settings(old: dict, new: dict) -> dict:
    """The selection settings that differ: dotted key -> [old, new]."""
    out = {}
    for path in SETTINGS:
        a, b = old, new
        for part in path:
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            out[".".join(path)] = [a, b]
    return out
