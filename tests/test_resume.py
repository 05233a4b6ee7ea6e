"""Resuming and the resources a run asks for. The driver SIGKILLed mid-run with every model stage on this
machine's 2 CPUs, then the same command run again: it resumes from Ray Data's checkpoint on those 2 CPUs, every
pair comes out once with the values of a clean run. A run Ray cannot schedule stops with one line instead of
waiting forever; a slow one does not."""

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from mapray.config import ModelConfig
from mapray.errors import ConfigError
from mapray.runtime import RunStalled, check_local_cpus, checkpointed, checkpointed_rows, skip_written, watched
from mapray.testing.compare import assert_same_rows
from mapray.testing.faults import kill_with_its_local_ray
from tests.conftest import dpo_config, dpo_input_lines


def test_the_start_up_check_counts_the_actors_and_the_light_tasks_beside_them():
    three = [ModelConfig(path="x", cpus_per_actor=0.5)] * 3
    check_local_cpus(2, three)  # 1.5 for the actors, 0.5 for the read and the row metrics with the write
    with pytest.raises(ConfigError, match=r"actors need 2 CPUs and the tasks beside them 0.5, but the local Ray "
                                          r"has 2;.*cpus_per_actor"):
        check_local_cpus(2, [ModelConfig(path="x", cpus_per_actor=1.0, actors=2)])
    with pytest.raises(ConfigError, match="actors need 1.75 CPUs"):
        check_local_cpus(2, [*three, ModelConfig(path="x", cpus_per_actor=0.25)])


def test_skip_written_keeps_only_the_rows_not_written():
    table = pa.table({"id": ["a", "b", None, "d"], "v": [1, 2, 3, 4]})
    kept = skip_written(table, "id", pa.array(["d", "a", "zz"]))
    assert kept.to_pydict() == {"id": ["b", None], "v": [2, 3]}
    large = table.cast(pa.schema([("id", pa.large_string()), ("v", pa.int64())]))
    assert skip_written(large, "id", pa.array(["b"]))["v"].to_pylist() == [1, 3, 4]


def _write(src: Path, rows: Path, ckpt: Path, attempt: str) -> str:
    """One attempt of a checkpointed read -> write; returns its execution's stats (they name the operators)."""
    with checkpointed(str(ckpt), "id") as unwritten:
        ds = unwritten(ray.data.read_parquet(str(src))).map_batches(
            lambda t: t.append_column("attempt", pa.array([attempt] * t.num_rows)), batch_format="pyarrow")
        ds.write_parquet(str(rows))
    return ds.stats()


def test_a_rerun_recovers_cut_short_writes_and_skips_written_rows_without_ray_datas_filter(tmp_path, local_ray):
    ids = [f"r{i}" for i in range(10)]
    pq.write_table(pa.table({"id": ids[:4]}), tmp_path / "first.parquet")
    pq.write_table(pa.table({"id": ids}), tmp_path / "all.parquet")
    rows, ckpt = tmp_path / "rows", tmp_path / "ckpt"
    _write(tmp_path / "first.parquet", rows, ckpt, "first")
    assert checkpointed_rows(str(ckpt)) == 4
    # a write a crash cut short: its ids recorded as pending (Ray Data writes that record first), its file written
    pq.write_table(pa.table({"id": ["r4", "r5"]}), ckpt / "cut_000000.pending.parquet")
    pq.write_table(pa.table({"id": ["r4", "r5"], "attempt": ["cut", "cut"]}), rows / "cut_000000-0.parquet")
    assert checkpointed_rows(str(ckpt)) == 4  # a pending record is not a written row

    stats = _write(tmp_path / "all.parquet", rows, ckpt, "second")
    written = pq.read_table(rows).to_pylist()
    assert collections.Counter(r["id"] for r in written) == collections.Counter(ids)  # each row once
    assert {r["id"]: r["attempt"] for r in written} == {i: "first" if i in ids[:4] else "second" for i in ids}
    assert not list(ckpt.glob("*.pending.parquet")) and checkpointed_rows(str(ckpt)) == 10
    # Ray Data's own filter is a pool of 1-CPU actors: the skip runs in the read's task instead
    assert "CheckpointFilter" not in stats and "skip_written" in stats, stats


def _echo():
    """An actor class that returns its batches after `sleep_s`; defined in a function so that Ray ships it by
    value (the workers cannot import this test module)."""

    class Echo:
        def __init__(self, sleep_s: float = 0.0):
            self.sleep_s = sleep_s

        def __call__(self, batch):
            time.sleep(self.sleep_s)
            return batch

    return Echo


def test_watchdog_stops_a_run_ray_cannot_schedule(local_ray):
    # two 1-CPU actors hold both CPUs; the half-CPU tasks feeding them can never run
    started = time.monotonic()
    with pytest.raises(RunStalled) as stalled, watched(limit_s=3):  # watches the datasets made inside
        ray.data.range(64, override_num_blocks=8).map_batches(lambda b: b, num_cpus=0.5) \
            .map_batches(_echo(), compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1).materialize()
    message = str(stalled.value)
    assert isinstance(stalled.value, ConfigError) and "\n" not in message  # the CLI's one `mapray: error:` line
    assert message.startswith("no progress for 3 s: Ray cannot schedule what this run asks for: CPU ")
    assert "MapBatches(Echo): 2 actors, CPU 2" in message and "CPU 2 in the cluster" in message
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 30  # the stopped execution gave its actors back
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_watchdog_lets_a_slow_batch_finish(local_ray):
    # the actor holds both CPUs, so the light step after it waits until the pool is done: asked > capacity
    # the whole time, yet each batch takes longer than the limit and the run must go on
    with watched(limit_s=1):
        items = ray.data.from_items([{"x": i} for i in range(6)], override_num_blocks=3)
        out = items.map_batches(_echo(), fn_constructor_kwargs={"sleep_s": 2.5}, batch_size=2, num_cpus=2,
                                compute=ray.data.ActorPoolStrategy(size=1)) \
            .map_batches(lambda b: b, num_cpus=0.25).take_all()
    assert sorted(r["x"] for r in out) == list(range(6))


# --- the driver killed with every model stage running, then the same command again ---

def _written(out: Path) -> int:
    return sum(checkpointed_rows(str(p)) for p in out.glob("_staging/run-*/checkpoint"))


def test_driver_killed_mid_run_resumes_with_every_model_stage(tmp_path, tiny, dpo_run):
    """The session's DPO run (tests/conftest.py) again, its driver killed: the clean run to compare with is that
    run, made once for every test that checks it."""
    lines = dpo_input_lines()
    n = len(lines)
    out = tmp_path / "out"
    config = dpo_config(tiny, dpo_run.uri, str(out))
    for model in (config["policy"], config["reference"], config["reward"]["model"]):
        model["batch_size"] = 4  # more, smaller writes: the kill lands between two of them, not after the last
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    command = [sys.executable, "-m", "mapray", "score", "--config", str(tmp_path / "run.yaml")]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)  # its own process group: the local Ray dies with it
    deadline = time.monotonic() + 400
    while not _written(out) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before it could be killed: make it longer"
    kill_with_its_local_ray(first)
    done_before = _written(out)
    assert 0 < done_before < n and not (out / "manifest.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] is True
    # every row the kill left unwritten, and only those, was scored again (cut-short writes included)
    assert manifest["counts"]["model_pass_rows_this_attempt"] == n - done_before
    assert not list((out / "_staging").glob("run-*"))  # staging removed once published

    clean, fresh_out = dpo_run.manifest, dpo_run.out
    assert clean["resumed"] is False
    assert {k: manifest["counts"][k] for k in ("input", "scored", "rejected", "selected")} == \
        {k: clean["counts"][k] for k in ("input", "scored", "rejected", "selected")}
    resumed, fresh = (pq.read_table(p / "scored").sort_by("pair_id") for p in (out, fresh_out))
    rejected = pq.read_table(out / "rejects").select(["pair_id", "reason"]).sort_by("pair_id")
    ids = resumed["pair_id"].to_pylist() + rejected["pair_id"].to_pylist()  # every pair exactly once
    assert collections.Counter(ids) == collections.Counter(_pair_id(x) for x in lines)
    assert rejected == pq.read_table(fresh_out / "rejects").select(["pair_id", "reason"]).sort_by("pair_id")
    assert manifest["counts"]["scored"] > n // 2  # most rows reach the models: the comparison below has teeth
    assert_same_rows(resumed, fresh, {"chosen_logps", "ref_rejected_logps", "reward_chosen", "explicit_margin",
                                      "implicit_margin", "map", "map_z"})


def _pair_id(line: bytes) -> str | None:
    """A line's prompt_id; None for a line that is not JSON (its reject has no pair id)."""
    try:
        return json.loads(line)["prompt_id"]
    except json.JSONDecodeError:
        return None
