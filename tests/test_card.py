"""The output folder's dataset card: `datasets.load_dataset(OUT)` reads scored/selected and rejects as-is."""

import pyarrow.parquet as pq
import pytest
import yaml

from mapray import card
from mapray import columns as C
from mapray.config import RunConfig, SelectionConfig, to_dict
from tests.test_selection import run_finish, staged_rows

MANIFEST = {
    "run_id": "run-0123456789abcdef",
    "config": to_dict(RunConfig(output="s3://bucket/run")),
    "models": {"policy": {"configured": "s3://ckpt/policy-v8", "engine": "torch", "dtype": "bfloat16",
                          "sha256": "ab" * 32}},
    "libraries": {"mapray": "0.1.0"},
    "counts": {"input": 12, "scored": 10, "rejected": 2, "selected": 4,
               "rejected_by_code": {"empty_response": {"count": 2, "example": "empty chosen response"}}},
    "selection": {"metric": "map_unreg", "alpha": 0.5, "rule": "top_k", "top_k": 4, "selected": 4,
                  "cutoff": {"score": 1.5, "pair_id": "p02"}},
    "pool_moments": {"explicit_margin": {"count": 10, "mean": 0.9, "std": 2.4}},
}


def _front_matter(text: str) -> dict:
    head, front, body = text.split("---\n", 2)
    assert head == "" and body.startswith("\n# mapray output `run-0123456789abcdef`")
    return yaml.safe_load(front)


def test_card_front_matter_and_text():
    text = card.render(MANIFEST)
    front = _front_matter(text)
    assert front["configs"] == [
        {"config_name": "default", "data_files": [{"split": "scored", "path": "scored/*.parquet"},
                                                  {"split": "selected", "path": "selected/*.parquet"}]},
        {"config_name": "rejects", "data_files": [{"split": "rejects", "path": "rejects/*.parquet"}]},
    ]
    assert "- metric: `map_unreg`, alpha 0.5" in text
    assert "- rule: top_k (the top 4 rows): 4 rows selected" in text
    assert "- cut-off: score 1.5 (pair_id `p02`)" in text
    assert "| rejected, empty_response (e.g. empty chosen response) | 2 |" in text and "| selected | 4 |" in text
    assert f"| policy | `s3://ckpt/policy-v8` | torch | bfloat16 | `{'ab' * 32}` |" in text
    config_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config_block) == MANIFEST["config"]  # the run's config, complete
    # a bare manifest (the publish protocol test writes one) still renders the front matter
    assert _front_matter(card.render({"run_id": "run-0123456789abcdef"}))["configs"] == front["configs"]
    # an empty selection is no split: datasets cannot load a 0-row split, and it would fail scored with it
    empty = card.render({**MANIFEST, "counts": {**MANIFEST["counts"], "selected": 0, "rejected": 0}})
    assert _front_matter(empty)["configs"][0]["data_files"] == [{"split": "scored", "path": "scored/*.parquet"}]
    assert "Empty here: selected/, rejects/ (0-row Parquet with the columns" in empty


def _load(out, tmp_path, name=None, **kwargs):
    import datasets

    return datasets.load_dataset(str(out), name, cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def test_load_dataset_reads_scored_selected_and_rejects(local_ray, tmp_path):
    out, counts, _, _ = run_finish(local_ray, tmp_path, staged_rows(n_rejected=2), 0.5,
                                   SelectionConfig(metric="map", threshold=1.5))
    assert (out / "README.md").read_text().startswith("---\nconfigs:\n")
    pairs = _load(out, tmp_path)
    assert set(pairs) == {"scored", "selected"}
    assert (pairs["scored"].num_rows, pairs["selected"].num_rows) == (10, 3) == (counts["scored"],
                                                                                 counts["selected"])
    assert pairs["scored"].column_names == pq.read_table(out / "scored").column_names
    assert sorted(pairs["selected"]["pair_id"]) == ["p00", "p05", "p08"] and all(pairs["selected"]["selected"])
    rejects = _load(out, tmp_path, "rejects")
    assert list(rejects) == ["rejects"] and rejects["rejects"].column_names == C.REJECTS_SCHEMA.names
    assert rejects["rejects"]["reason"] == ["empty chosen response"] * 2


def test_empty_selected_and_rejects_load_with_their_columns(local_ray, tmp_path):
    out, counts, _, _ = run_finish(local_ray, tmp_path, staged_rows(), 1.0,
                                   SelectionConfig(metric="map", threshold=100.0))
    assert (counts["scored"], counts["selected"], counts["rejected"]) == (10, 0, 0)
    scored, selected = pq.read_table(out / "scored"), pq.read_table(out / "selected")
    assert selected.num_rows == 0 and selected.schema == scored.schema
    rejects = pq.read_table(out / "rejects")
    assert rejects.num_rows == 0 and rejects.schema == C.REJECTS_SCHEMA
    pairs = _load(out, tmp_path)
    assert list(pairs) == ["scored"] and pairs["scored"].num_rows == 10  # an empty selection is no split
    # datasets 5.2 cannot load a 0-row split (huggingface/datasets#8401); streaming reads the columns
    rejects = _load(out, tmp_path, "rejects", streaming=True)["rejects"]
    assert list(rejects) == [] and list(rejects.features) == C.REJECTS_SCHEMA.names


@pytest.mark.parametrize("rule,value,how", [("ratio", 0.4, "the top 0.4 of the scored pool"),
                                            ("threshold", 1.5, "every row whose score exceeds 1.5")])
def test_card_says_how_each_rule_selects(rule, value, how):
    sel = {"metric": "map", "alpha": 1.0, "rule": rule, rule: value, "selected": 3}
    assert f"- rule: {rule} ({how}): 3 rows selected" in card.render({**MANIFEST, "selection": sel})
