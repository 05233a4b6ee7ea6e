"""Resuming and the resources a run asks for: the checkpoint's own parts (cut-short writes recovered, written rows
skipped) on a local Ray. The driver SIGKILLed while every model stage runs, then the same command again, is the
run story of tests/test_s3.py (the checkpoint on object storage, where a cluster's runs keep it). A run Ray cannot
schedule stops with one line instead of waiting forever; a slow one does not."""

import collections
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from mapray.config import ModelConfig
from mapray.errors import ConfigError
from mapray.outputs import OutputLayout
from mapray.pipeline import check_every_row_written
from mapray.runtime import RunStalled, check_local_cpus, checkpointed, checkpointed_rows, skip_written, watched


def test_the_start_up_check_counts_the_actors_and_the_light_tasks_beside_them():
    three = [ModelConfig(path="x", cpus_per_actor=0.5)] * 3
    check_local_cpus(2, three)  # 1.5 for the actors, 0.5 for the read and the row metrics with the write
    with pytest.raises(ConfigError, match=r"actors need 2 CPUs and the tasks beside them 0.5, but the local Ray "
                                          r"has 2;.*cpus_per_actor"):
        check_local_cpus(2, [ModelConfig(path="x", cpus_per_actor=1.0, actors=2)])
    with pytest.raises(ConfigError, match="actors need 1.75 CPUs"):
        check_local_cpus(2, [*three, ModelConfig(path="x", cpus_per_actor=0.25)])


@pytest.mark.parametrize("change,resumes", [
    # how the run runs: a run killed for memory resumes with a smaller batch, a run moved to a cluster with more
    # actors resumes there
    (["policy.batch_size=8", "reference.batch_size=8", "reward.models=[{path: r, batch_size: 2}]"], True),
    (["policy.actors=4", "policy.cpus_per_actor=0.5", "reference.token_budget=4096"], True),
    (["policy.packing=false", "policy.prefix_sharing=false", "policy.tree_attention=flex", "policy.lm_head_chunk=64",
      "reference.max_num_batched_tokens=4096", "reference.tensor_parallel_size=2",
      "reference.gpu_memory_utilization=0.5"], True),
    (["ray.address=ray://head:10001", "ray.num_cpus=8", "colocate_models=false", "diff={max_churn: 0.2}"], True),
    (["generation.model={path: g, batch_size: 4, actors: 2}"], False),  # another generator (below: its batch)
    # what it computes: a GPU in place of the CPU (device auto), the workers' environment (TF32, a vLLM backend)
    (["policy.gpus_per_actor=1"], False), (["ray.env_vars={NVIDIA_TF32_OVERRIDE: '0'}"], False),
    (["policy.max_length=512"], False), (["reference.dtype=bfloat16"], False), (["policy.engine=vllm"], False),
    (["policy.truncation_mode=keep_end"], False), (["metric.alpha=2.0"], False), (["input.limit=10"], False),
    (["selection.ratio=0.2"], False), (["cache=/c"], False), (["reward.models=[{path: r, weight: 2}]"], False),
])
def test_a_run_resumes_across_settings_that_say_how_it_runs_not_what_it_computes(change, resumes):
    from mapray.config import load_config
    from mapray.pipeline import computed_config

    base = ["input.uri=x", "output=/o", "policy.path=p", "reference.path=q", "metric.implicit=dpo",
            "reward.source=model", "reward.models=[{path: r}]"]
    assert (computed_config(load_config(None, base + change)) == computed_config(load_config(None, base))) == resumes


def test_self_play_samples_resume_across_the_same_settings(tmp_path):
    """The samples' key (the generator: the policy's settings unless generation.model is set) leaves out the same
    settings as a run's; a scoring run with one reward model too."""
    from mapray.config import GenerationConfig, generator_config, load_config
    from mapray.generation.run import generation_key
    from mapray.inputs import discover
    from mapray.pipeline import computed_config

    (tmp_path / "p.jsonl").write_text('{"prompt": "Name a prime."}\n')
    base = [f"input.uri={tmp_path / 'p.jsonl'}", "output=/o", "policy.path=p", "reward.source=model",
            "reward.model.path=r"]

    def key(*change: str) -> str:
        cfg = load_config(None, base + list(change))
        return generation_key(cfg, discover(cfg.input), GenerationConfig(), generator_config(cfg), "sha")

    assert key("policy.batch_size=2", "policy.gpu_memory_utilization=0.5") == key()
    assert key("policy.max_length=512") != key() and key("policy.gpus_per_actor=1") != key()
    assert key("generation.model={path: p, batch_size: 4}") == key("generation.model={path: p}")
    same = computed_config(load_config(None, base + ["reward.model.batch_size=1", "reward.model.actors=3"]))
    assert same == computed_config(load_config(None, base))
    assert computed_config(load_config(None, base + ["reward.model.max_length=64"])) != computed_config(
        load_config(None, base))


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
    # a commit the crash cut short on object storage: the record's copy into place landed, its delete did not
    for record in ("moved_000000.parquet", "moved_000000.pending.parquet"):
        pq.write_table(pa.table({"id": ["r6", "r7"]}), ckpt / record)
    pq.write_table(pa.table({"id": ["r6", "r7"], "attempt": ["moved", "moved"]}), rows / "moved_000000-0.parquet")
    assert checkpointed_rows(str(ckpt)) == 6

    stats = _write(tmp_path / "all.parquet", rows, ckpt, "second")
    written = pq.read_table(rows).to_pylist()
    assert collections.Counter(r["id"] for r in written) == collections.Counter(ids)  # each row once
    kept = {"r0": "first", "r1": "first", "r2": "first", "r3": "first", "r6": "moved", "r7": "moved"}
    assert {r["id"]: r["attempt"] for r in written} == {i: kept.get(i, "second") for i in ids}
    assert not list(ckpt.glob("*.pending.parquet")) and checkpointed_rows(str(ckpt)) == 10
    # Ray Data's own filter is a pool of 1-CPU actors: the skip runs in the read's task instead
    assert "CheckpointFilter" not in stats and "skip_written" in stats, stats


def test_a_model_pass_short_of_rows_stops_the_run_before_anything_is_published(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"), run_id="r1")
    rows = Path(layout.staged("rows"))
    rows.mkdir(parents=True)
    check_every_row_written(layout, 0, str(rows))  # an empty pool writes no file
    pq.write_table(pa.table({"id": ["a", "b", "c"]}), rows / "0.parquet")
    check_every_row_written(layout, 3, str(rows))
    with pytest.raises(ConfigError, match=rf"the model pass staged 3 of 4 rows at {rows} .*: remove "
                                          rf"{tmp_path}/out/_staging/r1 and run again"):
        check_every_row_written(layout, 4, str(rows))


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
