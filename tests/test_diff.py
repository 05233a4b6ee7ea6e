"""What changed between two runs: a nightly rescore (jobs/rescore.py, as the RayJob runs it) with a new policy, one
input file removed and one added, diffed against the previous run's output before publishing; the churn bound
stops it with the previous output left in place, a raised bound publishes it from the staged results;
`mapray diff` between the two outputs gives the same numbers, each checked against a pandas join of scored/."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from mapray import columns as C
from mapray.cli import main
from mapray.testing.tiny_models import perturbed_copy
from tests.conftest import dpo_config, dpo_input_lines

ROOT = Path(__file__).resolve().parent.parent


def rescore_job(config: Path, *overrides: str) -> int:
    """jobs/rescore.py run as `python jobs/rescore.py --config ...` runs it (in this process: its Ray is the
    session's); its exit code."""
    argv = sys.argv
    sys.argv = [str(ROOT / "jobs" / "rescore.py"), "--config", str(config), *[f"--set={o}" for o in overrides]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
    raise AssertionError("jobs/rescore.py did not exit")


def with_source(line: bytes, source: str) -> bytes:
    """An input line with a `source` column naming its file (a line that is not a JSON object stays as it is)."""
    try:
        row = json.loads(line)
    except ValueError:
        return line
    return json.dumps({**row, "source": source}).encode() if isinstance(row, dict) else line


def scored(out: Path) -> pd.DataFrame:
    return pq.read_table(out / "scored").to_pandas().set_index(C.PAIR_ID)


def expected_diff(old: pd.DataFrame, new: pd.DataFrame) -> dict:
    """The diff's counts and attribution by a pandas outer join of the two scored/ tables."""
    both = old.join(new, how="outer", lsuffix="_old", rsuffix="_new")
    in_old, in_new = both["selected_old"].notna(), both["selected_new"].notna()
    sel_old, sel_new = both["selected_old"].eq(True), both["selected_new"].eq(True)
    ex = ~((both["explicit_margin_new"] - both["explicit_margin_old"]).abs() <= 1e-6 * both[
        "explicit_margin_old"].abs().clip(lower=1))
    im = ~((both["implicit_margin_new"] - both["implicit_margin_old"]).abs() <= 1e-6 * both[
        "implicit_margin_old"].abs().clip(lower=1))
    cause = pd.Series("cutoff", index=both.index)
    cause[im & in_old & in_new] = "implicit_margin"
    cause[ex & in_old & in_new] = "explicit_margin"
    cause[ex & im & in_old & in_new] = "both_margins"
    cause[~in_new] = "removed_pair"
    cause[~in_old] = "new_pair"
    entered, left = sel_new & ~sel_old, sel_old & ~sel_new
    causes = ("new_pair", "removed_pair", "explicit_margin", "implicit_margin", "both_margins", "cutoff")
    return {"pairs": {"only_old": int((in_old & ~in_new).sum()), "only_new": int((in_new & ~in_old).sum()),
                      "in_both": int((in_old & in_new).sum())},
            "selected": {"old": int(sel_old.sum()), "new": int(sel_new.sum()), "both": int((sel_old & sel_new).sum()),
                         "entered": int(entered.sum()), "left": int(left.sum())},
            "attribution": {"entered": {c: int((cause[entered] == c).sum()) for c in causes},
                            "left": {c: int((cause[left] == c).sum()) for c in causes}},
            "changes": {pid: ("entered" if entered[pid] else "left", cause[pid]) for pid in both.index[entered | left]}}


def test_a_nightly_rescore_writes_its_diff_and_stops_above_the_churn_bound(tmp_path, tiny, dpo_run, capsys):
    lines = dpo_input_lines()  # bad lines after the tenth: rows set aside are in no pool
    for name, part in (("a", lines[:8]), ("b", lines[8:18]), ("c", lines[18:28])):
        (tmp_path / f"{name}.jsonl").write_bytes(b"\n".join(with_source(line, name) for line in part) + b"\n")
    # a warm cache, as a nightly job has: the session's DPO run (tests/conftest.py) scored these pairs with the
    # same reference, reward model and (night 2's) policy, so each night runs what changed and nothing else
    out, cache = tmp_path / "nightly", str(tmp_path / "cache")
    shutil.copytree(dpo_run.cache, cache)
    config = dpo_config(tiny, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(out),
                        policy=perturbed_copy(tiny["policy"], tmp_path / "policy-v1"), cache=cache)
    config["diff"] = {"max_churn": 0.25}
    config["selection"].update(by="source", quotas={"b": 2})  # each file's share kept: a 40%, b two rows
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    # night 1: nothing published yet, nothing to compare with
    assert rescore_job(tmp_path / "run.yaml") == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["from_cache_alone"] == ["reference", "reward"]  # night 1's policy is new to the cache
    assert first["diff"] == {"previous": None, "note": f"no published output at {out} to compare with"}
    assert not (out / "diff.json").exists()
    shutil.copytree(out, tmp_path / "night1")  # kept to diff against by hand below
    old = scored(out)
    # the run selected within each source file (per-group selection through the real pipeline)
    sizes = old.groupby("source").size()
    assert {g["value"]: (g["pool"], g["selected"]) for g in first["selection"]["groups"]} == {
        "a": (sizes["a"], int(sizes["a"] * 0.4)), "b": (sizes["b"], 2)}
    assert old.groupby("source")["selected"].sum().to_dict() == {"a": int(sizes["a"] * 0.4), "b": 2}

    # night 2: a new policy; a.jsonl gone, c.jsonl new. The selection moves more than 25%: not published
    night2 = [f"input.uri=[{tmp_path / 'b.jsonl'}, {tmp_path / 'c.jsonl'}]", f"policy.path={tiny['policy']}"]
    capsys.readouterr()
    assert rescore_job(tmp_path / "run.yaml", *night2) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside the stage lines
    assert len(err) == 1 and err[0].startswith("mapray: error: the selection changed more than diff.max_churn 0.25 "
                                               "allows: churn ")
    assert f"since run {first['run_id']}; " in err[0] and f"not published: {out} still holds run " in err[0]
    assert json.loads((out / "manifest.json").read_text())["run_id"] == first["run_id"]  # the trainer reads night 1
    staged = next((out / "_staging").glob("run-*/diff.json"))
    refused = json.loads(staged.read_text())

    # the operator looks, and publishes it anyway: the same staged results, no model pass again
    assert rescore_job(tmp_path / "run.yaml", *night2, "diff.max_churn=1") == 0
    second = json.loads((out / "manifest.json").read_text())
    assert second["counts"]["model_pass_rows_this_attempt"] == 0
    assert second["from_cache_alone"] == ["policy", "reference", "reward"]  # night 2: every value was cached
    assert second["diff"]["previous"] == {"output": str(out), "run_id": first["run_id"]}
    written = json.loads((out / "diff.json").read_text())
    new = scored(out)
    expected = expected_diff(old, new)
    for numbers in (written, refused):
        for key in ("pairs", "selected", "attribution"):
            assert numbers[key] == expected[key], key
    assert written["churn"] == refused["churn"] == second["diff"]["churn"] > 0.25
    assert written["churn"] == max(expected["selected"]["entered"] / expected["selected"]["new"],
                                   expected["selected"]["left"] / expected["selected"]["old"])
    # by hand: the reward model and the reference did not change (their values came from the cache), the policy did
    assert list(written["changed"]["models"]) == ["policy"]
    assert written["moved"]["explicit_margin"]["moved"] == 0
    assert written["moved"]["implicit_margin"]["moved"] == expected["pairs"]["in_both"] > 0
    assert expected["pairs"]["only_old"] > 0 and expected["pairs"]["only_new"] > 0
    changes = pq.read_table(out / "diff").to_pandas()
    assert {r.pair_id: (r.change, r.cause) for r in changes.itertuples()} == expected["changes"]

    # `mapray diff` between the two published outputs: the same numbers; a bound it exceeds exits 3
    assert main(["diff", str(tmp_path / "night1"), str(out), "--max-churn", "0.5"]) == (
        3 if written["churn"] > 0.5 else 0)
    printed = capsys.readouterr().out
    assert f"  selected: {expected['selected']['old']} -> {expected['selected']['new']}, " in printed
    again = json.loads((out / "diff.json").read_text())
    assert {k: again[k] for k in ("pairs", "selected", "attribution", "churn")} == {
        k: written[k] for k in ("pairs", "selected", "attribution", "churn")}
    for name, moved in written["moved"].items():  # sums in another order
        assert again["moved"][name] == pytest.approx(moved, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("args,message", [
    (["--max-churn", "1.5"], "mapray: error: --max-churn: must be in [0, 1], got 1.5"),
    (["--tolerance", "-1"], "mapray: error: --tolerance: must be >= 0, got -1.0"),
])
def test_diff_checks_its_arguments_first(tmp_path, capsys, args, message):
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), *args]) == 2
    assert capsys.readouterr().err.splitlines() == [message]


def write_run(out: Path, run_id: str, rows: list[tuple], policy_sha: str, rm_sha: str) -> None:
    """A published output whose scored/ holds `rows` (pair_id, explicit margin, implicit margin, reward model
    `b`'s margin, selected) and a manifest naming its models."""
    import pyarrow as pa

    ids, ex, im, b, sel = map(list, zip(*rows))
    (out / "scored").mkdir(parents=True)
    pq.write_table(pa.table({C.PAIR_ID: ids, "explicit_margin": ex, "reward_b_margin": b, "implicit_margin": im,
                             "selected": sel}), out / "scored" / "part-0.parquet")
    (out / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "config": {"selection": {"ratio": 0.5}, "metric": {"alpha": 1.0}},
        "models": {"policy": {"configured": "pol", "sha256": policy_sha},
                   "reward.models[1]": {"configured": "rm-b", "sha256": rm_sha}},
        "reward_combination": {"rule": "mean", "models": {"b": {"weight": 1.0}}}}))


def test_each_cause_of_a_change_is_attributed(local_ray, tmp_path):
    """A hand-built pair of runs where each entered or left pair has one known cause, and a reward model changed."""
    from mapray.changes import diff

    write_run(tmp_path / "old", "night-1", [
        ("stay", 3.0, 0.1, 3.0, True),      # selected both nights, nothing moved
        ("ex-up", 0.5, 0.1, 0.5, False),    # enters: its explicit margin (reward model b) rose
        ("im-down", 0.6, 2.0, 0.6, False),  # enters: its implicit margin fell (1e-9 on explicit: within tolerance)
        ("both", 2.5, 0.1, 2.5, True),      # leaves: both margins moved
        ("cut", 2.0, 0.5, 2.0, True),       # leaves: nothing of it moved, the cut-off did
        ("gone", 2.2, 0.2, 2.2, True),      # leaves: not in tonight's pool
        ("low", 0.1, 1.0, 0.1, False),      # in both, never selected
    ], policy_sha="a" * 64, rm_sha="b" * 64)
    write_run(tmp_path / "new", "night-2", [
        ("stay", 3.0, 0.1, 3.0, True),
        ("ex-up", 4.0, 0.1, 4.0, True),
        ("im-down", 0.6 + 1e-9, 0.0, 0.6 + 1e-9, True),
        ("both", 0.1, 3.0, 0.1, False),
        ("cut", 2.0, 0.5, 2.0, False),
        ("low", 0.1, 1.0, 0.1, False),
        ("fresh", 5.0, 0.0, 5.0, True),     # enters: new tonight
    ], policy_sha="c" * 64, rm_sha="d" * 64)
    numbers = diff(str(tmp_path / "old"), str(tmp_path / "new"))
    assert numbers["pairs"] == {"only_old": 1, "only_new": 1, "in_both": 6}
    assert numbers["selected"] == {"old": 4, "new": 4, "both": 1, "entered": 3, "left": 3}
    assert numbers["churn"] == 0.75
    assert numbers["attribution"] == {
        "entered": {"new_pair": 1, "removed_pair": 0, "explicit_margin": 1, "implicit_margin": 1, "both_margins": 0,
                    "cutoff": 0},
        "left": {"new_pair": 0, "removed_pair": 1, "explicit_margin": 0, "implicit_margin": 0, "both_margins": 1,
                 "cutoff": 1}}
    assert numbers["by_reward_model"] == {"reward_b_margin": {"entered": 1, "left": 1}}
    moved = numbers["moved"]
    assert (moved["explicit_margin"]["moved"], moved["implicit_margin"]["moved"]) == (2, 2)
    assert moved["explicit_margin"]["max_abs_change"] == pytest.approx(3.5)
    assert moved["implicit_margin"]["mean_change"] == pytest.approx((-2.0 + 2.9) / 6)
    assert set(numbers["changed"]["models"]) == {"policy", "reward.models[1]"} and not numbers["changed"]["settings"]
    changes = pq.read_table(tmp_path / "new" / "diff").to_pandas().set_index(C.PAIR_ID)
    assert changes[["change", "cause"]].to_dict("index") == {
        "ex-up": {"change": "entered", "cause": "explicit_margin"},
        "im-down": {"change": "entered", "cause": "implicit_margin"},
        "fresh": {"change": "entered", "cause": "new_pair"},
        "both": {"change": "left", "cause": "both_margins"}, "cut": {"change": "left", "cause": "cutoff"},
        "gone": {"change": "left", "cause": "removed_pair"}}
    assert changes.loc["gone", "explicit_margin_old"] == 2.2 and np.isnan(changes.loc["gone", "explicit_margin_new"])
    # a run against itself: nothing entered or left, diff/ still reads with its columns
    same = diff(str(tmp_path / "new"), str(tmp_path / "new"), max_churn=0.0)
    assert same["churn"] == 0 and same["selected"]["entered"] == same["selected"]["left"] == 0
    assert same["moved"]["implicit_margin"]["moved"] == 0
    assert same["moved"]["implicit_margin"]["correlation"] == pytest.approx(1.0)
    empty = pq.read_table(tmp_path / "new" / "diff")
    assert empty.num_rows == 0 and empty.column_names[:3] == [C.PAIR_ID, "change", "cause"]
