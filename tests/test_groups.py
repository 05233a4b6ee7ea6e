"""Per-group selection (`selection.by`, quotas, z-scores over the pool or within groups) on hand-built staged rows,
against a pandas groupby of the same pool; the group column's errors; the same through `mapray select` and the
Python API."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mapray import columns as C
from mapray.config import SelectionConfig
from mapray.errors import ConfigError
from mapray.selection import decide, mark
from tests.test_selection import staged_rows

GROUPS = ["web", "code", "math", None]  # None: rows with no value, the group "null"


def pool_table(n: int = 400, seed: int = 11) -> pa.Table:
    """`n` staged rows with rounded margins (many ties) and a `source` column of four groups of unequal sizes."""
    rng = np.random.default_rng(seed)
    table = staged_rows(np.round(rng.normal(size=n), 1), np.round(rng.normal(size=n), 1))
    source = rng.choice(len(GROUPS), size=n, p=[0.55, 0.25, 0.15, 0.05])
    return table.append_column("source", pa.array([GROUPS[i] for i in source], pa.string()))


def expected_by_pandas(table: pa.Table, sel: SelectionConfig, alpha: float) -> list[str]:
    """The pair_ids a per-group selection keeps, by a pandas groupby: each group's scores ranked (score desc,
    pair_id asc), its quota's rows or share kept (or its rows above the threshold)."""
    df = table.select([C.PAIR_ID, "explicit_margin", "implicit_margin", "source"]).to_pandas()
    df["group"] = df["source"].fillna("null")
    df["abs_im"] = df["implicit_margin"].abs()
    z = lambda x: (x - x.mean()) / x.std(ddof=0)  # noqa: E731 (population std, as the reference code)
    if sel.zscore == "group":
        zs = df.groupby("group")[["explicit_margin", "abs_im"]].transform(z)
    else:
        zs = df[["explicit_margin", "abs_im"]].apply(z)
    df["score"] = {"map_z": zs["explicit_margin"] - alpha * zs["abs_im"],
                   "map": df["explicit_margin"].abs() - alpha * df["abs_im"]}[sel.metric]
    kept = []
    for group, rows in df.groupby("group"):
        rows = rows.sort_values(["score", C.PAIR_ID], ascending=[False, True])
        quota = sel.quotas.get(group)
        if quota is None and sel.threshold is not None:
            kept += rows[rows["score"] > sel.threshold][C.PAIR_ID].tolist()
            continue
        if quota is None:
            quota = sel.top_k if sel.top_k is not None else sel.ratio
        k = min(quota, len(rows)) if isinstance(quota, int) else int(len(rows) * quota)
        kept += rows.head(k)[C.PAIR_ID].tolist()
    return sorted(kept)


QUOTAS = {"web": 0.1, "code": 20, "null": 500}  # a share, a count, a count beyond the group's size (short)


@pytest.mark.parametrize("sel,sample_rows,collect_limit,window_passes,sorted_groups", [
    # the sample is the pool: decided on the driver from it
    (SelectionConfig(by="source", ratio=0.3, quotas=QUOTAS), 32_768, 200_000, 0, 0),
    # a pool larger than the sample: every group's window in one pass
    (SelectionConfig(by="source", ratio=0.3, quotas=QUOTAS), 40, 200_000, 1, 0),
    (SelectionConfig(by="source", top_k=9, quotas=QUOTAS, zscore="group"), 40, 200_000, 1, 0),
    # windows of at most 150 rows a pass: math's (63 rows), then code's (110) in a second pass; web's (160) alone
    # is too large: its rows through Ray's sort
    (SelectionConfig(by="source", ratio=0.3, quotas=QUOTAS, zscore="group"), 40, 300, 2, 1),
    # a threshold within each group (groups without a quota), counted in the same pass
    (SelectionConfig(metric="map", by="source", threshold=0.75, quotas={"code": 5}), 40, 200_000, 1, 0),
])
def test_per_group_selection_equals_a_pandas_groupby(local_ray, monkeypatch, sel, sample_rows, collect_limit,
                                                     window_passes, sorted_groups):
    from mapray import histograms, selection

    monkeypatch.setattr(histograms, "COLLECT_LIMIT", collect_limit)
    sorts = []
    real_sort = selection.kth_best
    monkeypatch.setattr(selection, "kth_best", lambda *args: sorts.append(args) or real_sort(*args))
    passes = []
    real_reduce = selection.reduce
    monkeypatch.setattr(selection, "reduce", lambda rows, fn, **kw: passes.append(fn.__name__) or real_reduce(
        rows, fn, **kw))
    table = pool_table()
    blocks = [table.slice(i, 50) for i in range(0, table.num_rows, 50)]
    decision = decide(local_ray.data.from_arrow(blocks), sel, 0.5, key=C.ROW, sample_rows=sample_rows)
    marked = pa.concat_tables([mark(block, decision, key=C.ROW) for block in blocks])
    kept = sorted(marked.filter(marked.column(C.SELECTED)).column(C.PAIR_ID).to_pylist())
    assert kept == expected_by_pandas(table, sel, 0.5)
    assert decision.count == len(kept) and len(sorts) == sorted_groups
    assert passes == ["_group_windows"] * window_passes
    sizes = pd.Series(table.column("source").to_pylist()).fillna("null").value_counts()
    summary = {str(g["value"]) if g["value"] is not None else "null": g for g in decision.summary()["groups"]}
    assert {name: g["pool"] for name, g in summary.items()} == sizes.to_dict()
    selected = pd.Series(marked.filter(marked.column(C.SELECTED)).column("source").to_pylist()).fillna("null")
    assert {name: g["selected"] for name, g in summary.items()} == selected.value_counts().reindex(
        sizes.index, fill_value=0).to_dict()
    if sel.threshold is None:
        assert summary["null"]["short"] == 500 - sizes["null"] and summary["null"]["selected"] == sizes["null"]
        assert summary["code"] == {**summary["code"], "rule": "top_k", "top_k": 20, "selected": 20}
        assert summary["web"]["rule"] == "ratio" and summary["web"]["selected"] == int(sizes["web"] * 0.1)
        # the cut-off each group records is its last kept row
        web = marked.filter(pa.compute.and_(marked.column(C.SELECTED),
                                            pa.compute.equal(marked.column("source"), "web")))
        assert summary["web"]["cutoff"]["pair_id"] in web.column(C.PAIR_ID).to_pylist()
    else:
        assert summary["web"]["rule"] == "threshold" and summary["code"]["rule"] == "top_k"


def test_map_z_within_groups_is_written_as_ranked(local_ray):
    """With zscore: group, the map_z a row is published with is its group's z-scores, the score it was ranked by."""
    table = pool_table(120)
    sel = SelectionConfig(by="source", ratio=0.5, zscore="group")
    decision = decide(local_ray.data.from_arrow([table]), sel, 1.0, key=C.ROW)
    marked = mark(table, decision, key=C.ROW).to_pandas()
    for _, rows in marked.groupby(marked["source"].fillna("null")):
        z = lambda x: (x - x.mean()) / x.std(ddof=0)  # noqa: E731
        expected = z(rows["explicit_margin"]) - z(rows["implicit_margin"].abs())
        np.testing.assert_allclose(rows["map_z"], expected, atol=1e-12)
        assert rows["selected"].sum() == len(rows) // 2


@pytest.mark.parametrize("selection,message", [
    ({"quotas": {"web": 3}}, "selection.quotas applies to groups: set selection.by to the column that names them"),
    ({"zscore": "group"}, "selection.zscore applies to groups"),
    ({"by": "source", "quotas": {"web": -1}}, "selection.quotas.web: a count of rows must be >= 0, got -1"),
    ({"by": "source", "quotas": {"web": 1.5}}, "selection.quotas.web: a share of the group must be in [0, 1]"),
    ({"by": "source", "quotas": {1: 3}}, "selection.quotas: keys must be text (quote them), got int 1"),
    ({"by": "source", "quotas": {"web": "all"}}, "selection.quotas.web: expected int or float, got str 'all'"),
])
def test_bad_group_configs_stop_with_one_line(selection, message):
    from mapray.typed_config import from_dict

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        from_dict(SelectionConfig, selection, "selection")


def test_a_group_column_that_is_missing_or_not_a_group(local_ray):
    from mapray.groups import check_group_column

    schema = pool_table(4).schema.append(pa.field("score", pa.float64()))
    schema = schema.append(pa.field("tags", pa.list_(pa.string())))
    with pytest.raises(ConfigError, match=r"^selection.by: scored/ has no column 'domain' \(its columns: prompt, "):
        check_group_column(schema, "domain", "selection.by", "scored/")
    for column, kind in (("score", "double"), ("tags", "list<item: string>")):
        with pytest.raises(ConfigError, match=f"^selection.by: column '{column}' holds {kind}, not values to group"):
            check_group_column(schema, column, "selection.by", "scored/")
    check_group_column(schema, "source", "selection.by", "scored/")  # text: fine


def test_too_many_groups_is_an_id_column(local_ray, monkeypatch):
    from mapray import groups

    monkeypatch.setattr(groups, "MAX_GROUPS", 3)
    table = pool_table(40)
    with pytest.raises(ConfigError, match=r"^selection.by: column 'source' has 4 distinct values in the pool; "
                                          r"per-group selection takes at most 3 groups"):
        decide(local_ray.data.from_arrow([table]), SelectionConfig(by="source"), 1.0, key=C.ROW)


def test_mapray_select_by_group_on_a_published_output(local_ray, tmp_path, capsys):
    """`mapray select --by --quota --zscore` over a published scored/: the rows kept per group are the pandas
    groupby's; the manifest, the card and the report's breakdown name the groups; a quota naming no group is a
    warning, an unknown column one line before Ray starts."""
    import json

    import pyarrow.parquet as pq

    from mapray.cli import main
    from mapray.report import ReportSettings, by_group_of_run
    from tests.test_report import write_output

    out = tmp_path / "out"
    write_output(out)
    assert main(["select", "--output", str(out), "--by", "domain", "--quota", "math=10", "--quota", "cod=0.5",
                 "--zscore", "group", "--ratio", "0.25", "--alpha", "0.5"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "warning: selection.quotas names 'cod', which no row of the pool has in column 'domain'" in printed
    assert "Parquet dataset sampling" not in captured.err  # Ray Data's bars are a terminal's, not a log's
    scored = pq.read_table(out / "scored")
    kept = sorted(scored.filter(scored.column(C.SELECTED)).column(C.PAIR_ID).to_pylist())
    sel = SelectionConfig(by="domain", ratio=0.25, quotas={"math": 10, "cod": 0.5}, zscore="group")
    assert kept == expected_by_pandas(scored.rename_columns(
        ["source" if c == "domain" else c for c in scored.column_names]), sel, 0.5)
    manifest = json.loads((out / "manifest.json").read_text())
    groups = {g["value"]: g for g in manifest["selection"]["groups"]}
    assert {v: (g["rule"], g["selected"]) for v, g in groups.items()} == {
        "math": ("top_k", 10), "code": ("ratio", 25), "chat": ("ratio", 25)}  # 100 rows a group
    assert manifest["config"]["selection"]["by"] == "domain" and manifest["counts"]["selected"] == 60
    card = (out / "README.md").read_text()
    assert "- per group of column `domain` (3 groups; map_z from each group's own moments):" in card
    assert f"| `math` | top_k 10 | 100 | 10 | {groups['math']['cutoff']['score']!r} |" in card
    # the report breaks a per-group run down by its groups unless told otherwise
    assert by_group_of_run(ReportSettings(), "domain").by == "domain"
    assert by_group_of_run(ReportSettings(by="prompt"), "domain").by == "prompt"
    assert main(["select", "--output", str(out), "--by", "domian"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mapray: error: --by: scored/ has no column 'domian' (its columns: prompt, domain, pair_id, explicit_margin, "
        "implicit_margin, chosen_tokens, rejected_tokens, map, map_unreg, map_z, selected)"]


def test_a_run_checks_its_group_column_against_the_input_before_ray_starts(tmp_path, tiny):
    from mapray.config import load_config
    from mapray.pipeline import plan
    from tests.conftest import UF, dpo_config

    lines = UF.read_bytes().splitlines()[:4]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    base = dpo_config(tiny, str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
    for by, message in (("source", r"^selection.by: the input has no column 'source' \(its columns: prompt_id, "
                                   r"prompt, chosen, rejected, score_chosen, score_rejected\)$"),
                        ("chosen", r"^selection.by: column 'chosen' holds list<item: struct<"),
                        ("score_chosen", r"^selection.by: column 'score_chosen' holds double, not values to group")):
        with pytest.raises(ConfigError, match=message):
            plan(load_config(None, [f"selection.by={by}"], base=base))


def test_the_python_api_selects_per_group(local_ray):
    import mapray

    table = pool_table(200).drop_columns([C.ROW])
    sel = SelectionConfig(by="source", ratio=0.25, quotas={"code": 3})
    rows, decision = mapray.select(local_ray.data.from_arrow(table), sel, alpha=0.5)
    kept = rows.filter(expr=f"{C.SELECTED}").to_pandas()
    assert sorted(kept[C.PAIR_ID]) == expected_by_pandas(table, sel, 0.5)
    assert decision.summary()["by"] == "source" and len(decision.summary()["groups"]) == 4
    with pytest.raises(ConfigError, match=r"^selection.by: the Dataset has no column 'domain' \(its columns: "):
        mapray.select(local_ray.data.from_arrow(table), by="domain")
