"""The global pass on hand-built staged rows (no models): MAP forms from one alpha, the three selection rules,
and empty folders that keep their schema."""

import json
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapray import columns as C
from mapray import metrics, pipeline
from mapray.config import SelectionConfig, load_config
from mapray.errors import ConfigError
from mapray.outputs import OutputLayout, write_results
from mapray.selection import decide, mark

M_EX = [3.0, -1.0, 2.0, 0.5, 2.0, -4.0, 1.625, 0.0, 5.0, -2.0]
M_IM = [0.5, -2.0, 1.0, 0.0, -1.0, 3.0, 0.25, -0.5, 4.0, 1.0]
# with alpha 0.5 (exact in binary): map       = [2.75, 0, 1.5, 0.5, 1.5, 2.5, 1.5, -0.25, 3, 1.5]
#                                   map_unreg = [2.75, 0, 1.5, 0.5, 2.5, -5.5, 1.5, 0.25, 3, -2.5]
BASE = {"input": {"uri": "x"}, "output": "o", "policy": {"path": "p"}}


def staged_rows(m_ex=M_EX, m_im=M_IM, n_rejected: int = 0) -> pa.Table:
    """Rows as the model pass stages them (public rows with the row key): an own column, the margins, the
    reject columns; the last `n_rejected` rows carry a reject reason."""
    n = len(m_ex) + n_rejected
    reject = [None] * len(m_ex) + ["empty chosen response"] * n_rejected
    table = pa.table({
        "prompt": [f"question {i}" for i in range(n)],
        C.PAIR_ID: [f"p{i:02d}" for i in range(n)],
        "explicit_margin": pa.array(list(m_ex) + [None] * n_rejected, pa.float64()),
        "implicit_margin": pa.array(list(m_im) + [None] * n_rejected, pa.float64()),
    })
    rejects = {C.REJECT_REASON: reject, "reject_stage": [None if r is None else "normalize" for r in reject],
               "reject_source": [None if r is None else f"in.jsonl:{i + 1}" for i, r in enumerate(reject)],
               "reject_raw": [None if r is None else json.dumps({"prompt": f"question {i}"})
                              for i, r in enumerate(reject)]}
    for name, values in rejects.items():
        table = C.set_column(table, name, values, pa.string())
    return C.set_column(table, C.ROW, [f"row{i}" for i in range(n)], pa.string())


def run_finish(local_ray, tmp_path, table: pa.Table, alpha: float, sel: SelectionConfig, blocks: int = 3):
    """The global pass (decide, then the writes) over `table` split into several blocks, published; returns
    (out, counts, selection summary, moments)."""
    per = -(-table.num_rows // blocks) or 1
    rows = local_ray.data.from_arrow([table.slice(i, per) for i in range(0, table.num_rows, per)])
    layout = OutputLayout(str(tmp_path / "out"), run_id="test")
    selection = decide(rows, sel, alpha, key=C.ROW)
    counts = write_results(rows, partial(mark, selection=selection, key=C.ROW), selection, layout)
    chosen, moments = selection.summary(), pipeline.moments(selection)
    layout.publish({"run_id": "test", "counts": counts, "selection": chosen, "pool_moments": moments})
    return tmp_path / "out", counts, chosen, moments


def by_hand(alpha: float) -> dict[str, np.ndarray]:
    m_ex, m_im = np.array(M_EX), np.array(M_IM)
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731 (population std, as the reference code)
    return {"map": np.abs(m_ex) - alpha * np.abs(m_im), "map_unreg": m_ex - alpha * m_im,
            "map_z": z(m_ex) - alpha * z(np.abs(m_im))}


@pytest.mark.parametrize("metric,rule,value,expected_ids", [
    # the paper's rule, MAP > tau: p02, p04, p06 and p09 equal tau (1.5) and are not kept
    ("map", "threshold", 1.5, ["p00", "p05", "p08"]),
    # p02 and p06 tie at 1.5 for the 4th place: the smaller pair_id is kept
    ("map_unreg", "top_k", 4, ["p00", "p02", "p04", "p08"]),
    ("map_z", "ratio", 0.35, None),  # floor(0.35 * 10) = 3 rows
])
def test_global_pass_values_and_selection_by_hand(local_ray, tmp_path, metric, rule, value, expected_ids):
    alpha = 0.5
    out, counts, chosen, _ = run_finish(local_ray, tmp_path, staged_rows(), alpha,
                                        SelectionConfig(metric=metric, **{rule: value}))
    t = pq.read_table(out / "scored")
    order = np.argsort(t.column(C.PAIR_ID).to_pylist())  # rows come back in any block order
    expected = by_hand(alpha)
    for name, values in expected.items():
        assert t.column(name).to_numpy()[order] == pytest.approx(values, abs=1e-12), name
    ids = sorted(t.column(C.PAIR_ID).to_pylist())
    keep = expected[metric] > value if rule == "threshold" else metrics.top_k_mask(
        expected[metric], ids, metrics.selection_count(len(ids), rule, value))
    kept = [i for i, k in zip(ids, keep) if k]
    assert kept == (expected_ids or kept) and len(kept) == (3 if rule == "ratio" else len(expected_ids))
    assert t.column("selected").to_numpy()[order].tolist() == keep.tolist()
    assert sorted(pq.read_table(out / "selected").column(C.PAIR_ID).to_pylist()) == kept
    assert counts["selected"] == chosen["selected"] == len(kept)
    assert (chosen["metric"], chosen["alpha"], chosen["rule"], chosen[rule]) == (metric, alpha, rule, value)
    if rule == "threshold":
        assert "cutoff" not in chosen
    else:  # the cut-off is the last kept row
        last = min((expected[metric][i], ids[i]) for i in np.flatnonzero(keep))
        assert chosen["cutoff"] == {"score": pytest.approx(last[0], abs=1e-12), "pair_id": last[1]}
    assert t.column_names == ["prompt", C.PAIR_ID, "explicit_margin", "implicit_margin", "map", "map_unreg",
                              "map_z", "selected"]  # the documented order (columns.SCORED)


@pytest.mark.parametrize("metric,rule,value,collect_limit,window", [
    ("map_z", "ratio", 0.3, 200_000, True),  # the window around the sample's estimate: one pass
    ("map_z", "ratio", 0.3, 200_000, False),  # the histogram, then the cut-off bin's rows sorted on the driver
    ("map_unreg", "top_k", 37, 200_000, True),
    ("map_unreg", "top_k", 37, 200_000, False),
    ("rank_disagreement", "top_k", 150, 5, True),  # two values: a heavy tie, through Ray's sort
    ("map", "threshold", 0.75, 200_000, True),  # counted in one pass
])
def test_a_pool_larger_than_the_sample_is_ranked_by_bins(local_ray, monkeypatch, metric, rule, value, collect_limit,
                                                         window):
    """The passes a large pool takes (a sample of 40 rows; the window the sample predicts, or 8 bins and the cut-off
    bin collected or sorted by Ray) keep exactly the rows a sort of the whole pool keeps, ties at the boundary by
    pair_id; copies of a duplicated pair_id are found across blocks."""
    from mapray import histograms, selection

    monkeypatch.setattr(histograms, "COLLECT_LIMIT", collect_limit)
    if not window:
        monkeypatch.setattr(selection, "_cutoff_from_window", lambda *args: None)
    passes = []  # the passes decide makes after its first one, by the function each maps over the blocks
    real_reduce = selection.reduce
    monkeypatch.setattr(selection, "reduce", lambda rows, fn, **kw: passes.append(fn.__name__) or real_reduce(
        rows, fn, **kw))
    rng = np.random.default_rng(5)
    n = 400
    m_ex = np.round(rng.normal(size=n), 1)  # rounded: many ties
    m_im = np.round(rng.normal(size=n), 1)
    table = staged_rows(m_ex, m_im)
    # two identical copies of p07 and two different rows both called p11, in other blocks
    copies = table.take([7, 11]).to_pylist()
    copies[0][C.ROW], copies[1][C.ROW], copies[1]["prompt"] = "row7-copy", "row11-copy", "something else"
    table = pa.concat_tables([table, pa.Table.from_pylist(copies, schema=table.schema)])
    rows = local_ray.data.from_arrow([table.slice(i, 50) for i in range(0, table.num_rows, 50)])
    sel = SelectionConfig(metric=metric, **{rule: value})
    decision = decide(rows, sel, 0.5, key=C.ROW, sample_rows=40, bins=8)
    assert decision.duplicates == {"row7-copy": "duplicate pair_id: an identical copy of a scored row",
                                    "row11": "duplicate pair_id: 2 rows with different content share it",
                                    "row11-copy": "duplicate pair_id: 2 rows with different content share it"}
    pool = np.array([i for i in range(n) if i != 11])
    ids = [f"p{i:02d}" for i in pool]
    assert decision.pool.explicit.count == n - 1
    assert decision.pool.explicit.std == pytest.approx(m_ex[pool].std(), abs=1e-12)
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    scores = {"map_z": z(m_ex[pool]) - 0.5 * z(np.abs(m_im[pool])), "map_unreg": m_ex[pool] - 0.5 * m_im[pool],
              "map": np.abs(m_ex[pool]) - 0.5 * np.abs(m_im[pool]),
              "rank_disagreement": (np.sign(m_im[pool]) != np.sign(m_ex[pool])).astype(float)}[metric]
    marked = pa.concat_tables([mark(t, decision, key=C.ROW) for t in (table.slice(i, 50) for i in
                                                                        range(0, table.num_rows, 50))])
    kept = sorted(r[C.PAIR_ID] for r in marked.filter(marked.column(C.SELECTED)).to_pylist())
    keep = scores > value if rule == "threshold" else metrics.top_k_mask(
        scores, ids, metrics.selection_count(n - 1, rule, value))
    assert kept == sorted(i for i, k in zip(ids, keep) if k)
    assert decision.count == len(kept) and (rule == "threshold") == (decision.cutoff is None)
    # the copies set aside: the pool's moments once more; then the cut-off
    after = (["_count_above"] if rule == "threshold" else ["_window"] if window and collect_limit > 5
             else ["_bin_counts"] if window else ["_bin_counts", "_in_bin"])
    assert passes == ["_moments", *after]


def test_nothing_scored_still_writes_every_schema(local_ray, tmp_path):
    out, counts, chosen, _ = run_finish(local_ray, tmp_path, staged_rows([], [], n_rejected=2), 1.0,
                                        SelectionConfig())
    assert (counts["scored"], counts["selected"], counts["rejected"]) == (0, 0, 2)
    scored = pq.read_table(out / "scored")
    assert scored.num_rows == 0 and scored.column_names == ["prompt", C.PAIR_ID, "explicit_margin",
                                                            "implicit_margin", "map", "map_unreg", "map_z",
                                                            "selected"]
    assert pq.read_table(out / "selected").schema == scored.schema
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert [r["reason"] for r in rejects] == ["empty chosen response"] * 2
    assert json.loads(rejects[0]["raw"])["prompt"] in ("question 0", "question 1")


def test_selection_config_rules():
    assert SelectionConfig().rule == ("ratio", 0.4)
    # a YAML that sets top_k without touching ratio keeps working, as before ratio became optional
    assert load_config(None, ["selection.top_k=10"], base=BASE).selection.rule == ("top_k", 10)
    assert load_config(None, ["selection.threshold=0.5"], base=BASE).selection.rule == ("threshold", 0.5)
    assert load_config(None, ["selection.ratio=0.2"], base=BASE).selection.rule == ("ratio", 0.2)
    cleared = load_config(None, ["selection.ratio=null", "selection.top_k=3"],
                          base={**BASE, "selection": {"ratio": 0.2}})
    assert cleared.selection.rule == ("top_k", 3)


@pytest.mark.parametrize("selection,message", [
    ({"ratio": 0.2, "top_k": 5}, "selection.ratio=0.2 and selection.top_k=5: set only one of ratio, top_k, "
                                 "threshold"),
    ({"top_k": 5, "threshold": 1.0}, "selection.top_k=5 and selection.threshold=1.0: set only one of"),
    ({"ratio": float("nan")}, "selection.ratio: must be"),  # finite, in [0, 1]
    ({"ratio": -0.1}, "selection.ratio: must be in [0, 1], got -0.1"),
    ({"top_k": -1}, "selection.top_k: must be >= 0, got -1"),
    ({"threshold": float("inf")}, "selection.threshold: must be a finite number, got inf"),
    ({"metric": "mapz"}, "selection.metric: 'mapz' is not one of map_z, map, map_unreg"),
])
def test_bad_selection_configs(selection, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, base={**BASE, "selection": selection})
    assert message in str(e.value) and "\n" not in str(e.value)
