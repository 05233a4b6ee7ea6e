"""How a scoring run runs on Ray: starting Ray with room for what the run asks for, a model stage as an actor
pool, Ray Data's job checkpointing around the staged write, and a watchdog that stops a run Ray cannot schedule.
`pipeline.py` tells the story of a run; this module is the machinery under it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from functools import partial

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.checkpoint import CheckpointConfig, IdColumnCheckpointManager
from ray.data.context import ShuffleStrategy

from mapray.config import ModelConfig, RayConfig
from mapray.errors import ConfigError

log = logging.getLogger(__name__)

# Reading, normalizing and the per-row metrics are light, I/O-bound tasks: asking a whole CPU each would leave
# them waiting behind the model actors on small machines (Ray Data budgets CPUs across operators).
LIGHT_TASK_CPUS = 0.25
# Beside the actors, the model pass runs two light tasks: the read of staged rows (skipping the written ones)
# and the row metrics with the staged write. Nothing else: Ray Data's own checkpoint filter is never planned.
LIGHT_TASKS_BESIDE_ACTORS = 2
# How long a run may sit with no actor at work and nothing moving while it asks Ray for more than the cluster
# has, before it stops. Generous: an autoscaling cluster may take minutes to bring a node up.
STALL_LIMIT_S = 600.0
_STALL_LIMIT_KEY = "mapray.stall_limit_s"  # a DataContext key: the watchdog reads it from its execution


class RunStalled(ConfigError):
    """The run asks Ray for more than the cluster has and cannot go on: like a config error, one line."""


def ensure_ray(cfg: RayConfig | None = None, models: list[ModelConfig] = ()) -> None:
    """The Ray this process is connected to, or else one started as `cfg` says (never a second one)."""
    if not ray.is_initialized():
        _start_ray(cfg or RayConfig(), models)


def init_ray(cfg: RayConfig, models: list[ModelConfig]) -> None:
    """A run's Ray: `ensure_ray`, with this process's Ray Data shuffles sized for it (`tune_ray_data`)."""
    ensure_ray(cfg, models)
    tune_ray_data(ray.data.DataContext.get_current())
    # Ray Data warns once per process, at a materialize, when `ray.available_resources()` shows no free CPU at that
    # instant: on a small machine a race with the light tasks of the step before (seen once in CI on a successful
    # rescore). A run that really cannot be scheduled is stopped by `watched` with one line; the key is taken here
    # so the warning never reaches a run's console.
    from ray.util.debug import log_once

    log_once("cpu_warning")


def tune_ray_data(ctx: ray.data.DataContext) -> None:
    """Ray Data's shuffles and Parquet reads sized for the Ray they run on.

    Shuffles (the selection's sort, the duplicate count, the cache's joins) default to 200 partitions when
    Ray Data cannot tell the input's block count: a task and an output block each, seconds of fixed cost per run
    on a small machine. One per cluster CPU keeps every CPU busy.

    On one machine the sorts and group-bys use Ray Data's sort-based pull shuffle (plain tasks): its default
    (`SHUFFLE_V2`) starts a pool of aggregator actors per shuffle, measured at ~4.7 s of fixed cost per sort or
    group-by even on 10 rows (0.15 s pull-based), paid twice by every run's global pass. A cluster of several nodes
    keeps Ray Data's default, built for pools spread over nodes.

    On one machine Parquet is read by Ray Data's first datasource: its default (`use_datasource_v2`) starts a pool
    of footer-reading actors for every `read_parquet`, measured at 1.3 s per read of a 30-row folder here (0.1 s
    with the first), and a run reads Parquet five to seven times. A cluster keeps the actors, which spread the
    footer reads of thousands of object-store files over its nodes. And a read makes 2 x CPUs tasks at the least
    (Ray Data's own floor is 200 whatever the machine: a 1M-row scored/ of 200 files read by 200 tasks took 9.7 s
    for the selection's two narrow passes here, 2.4 s with 4); Ray Data still splits a large read into blocks of
    at most 128 MiB."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ctx.default_hash_shuffle_parallelism = max(2, cpus)
    if sum(node["Alive"] for node in ray.nodes()) == 1:
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        ctx.use_datasource_v2 = False
        ctx.read_op_min_num_blocks = 2 * max(1, cpus)


@contextlib.contextmanager
def hash_shuffled():
    """Datasets made inside use Ray Data's hash shuffle (`SHUFFLE_V2`) whatever `tune_ray_data` chose: key-based
    repartitioning exists only there. A dataset keeps the DataContext it was made with."""
    ctx = ray.data.DataContext.get_current()
    previous = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SHUFFLE_V2
    try:
        yield
    finally:
        ctx.shuffle_strategy = previous


# No worker processes started ahead of need: Ray prestarts one per CPU for the driver (six idle ones were counted
# during a 1M-row select here), each importing Ray (~0.5 s of CPU) while the run's own tasks and model actors
# start on the same cores. Measured on the 40-pair tiny run: 23.9 s against 25.9 s (six runs each, 2 cores).
LOCAL_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


def _start_ray(cfg: RayConfig, models: list[ModelConfig]) -> None:
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # vLLM reads its settings from the environment: the driver's VLLM_* variables reach every worker
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    env_vars.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # unset, vLLM's CPU backend sized it to 17 GiB here
    # transformers' weight-loading bars, one per actor and model, interleaved on the driver's terminal, and vLLM's
    # engine start-up report (dozens of INFO/WARNING lines per actor); a VLLM_LOGGING_LEVEL of the driver's wins
    env_vars.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env_vars.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    env_vars.update(cfg.env_vars)
    # Ray's own logging at the level this process gave its logger (the command line turns it down: mapray.console)
    kwargs = {"log_to_driver": True, "logging_level": logging.getLogger("ray").level or logging.INFO}
    if address:  # a cluster's workers get the variables from the job's runtime environment
        ray.init(address=address, runtime_env={"env_vars": env_vars}, **kwargs)
        return
    num_cpus = cfg.num_cpus or os.cpu_count() or 1
    check_local_cpus(num_cpus, models)
    # vLLM's engine inside each actor rather than in a process of its own: that process imports vLLM again and,
    # when Ray Data ends the actor, prints multiprocessing's resource-tracker tracebacks. Measured on the tiny
    # self-play round here (2 cores): sampling 36.6 s -> 17.5 s, the same samples and log-probs. A cluster keeps
    # vLLM's default (not measured on GPUs); `ray.env_vars` or the driver's own variable overrides either way.
    env_vars.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # every Parquet read starts this many footer-reading actors (Ray Data's default: 32 processes, whatever the
    # machine); on one machine, one per CPU reads the footers as fast
    env_vars.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, int(num_cpus))))
    # A local Ray's processes inherit this process's environment, so the variables go there (the ones this process
    # set itself win, but not over ray.env_vars): a runtime environment would start every worker process through
    # Ray's setup_worker.py and its runtime-env agent, ~0.1-0.3 s of CPU each, measured at 0.8 s more before the
    # first tasks of a run ran on 2 cores, and paid again by every model actor.
    for name, value in env_vars.items():
        if name in cfg.env_vars:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,  # never a stray local head
             _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
    if sys.platform.startswith("linux"):  # a driver killed outright must not leave Ray's agents behind
        from mapray.reaper import watch_local_ray

        watch_local_ray()


def cpus_asked(models: list[ModelConfig]) -> float:
    """CPUs the model pass holds at once: every actor pool for the whole pass, plus the light tasks that must
    run beside them, or the pipeline waits forever (seen with two 1-CPU actors on a 2-CPU machine)."""
    return sum(m.actors * m.cpus_per_actor for m in models) + LIGHT_TASKS_BESIDE_ACTORS * LIGHT_TASK_CPUS


def check_local_cpus(num_cpus: float, models: list[ModelConfig]) -> None:
    needed = cpus_asked(models)
    if needed > num_cpus:
        actors = needed - LIGHT_TASKS_BESIDE_ACTORS * LIGHT_TASK_CPUS
        raise ConfigError(f"the model stages' actors need {actors:g} CPUs and the tasks beside them "
                          f"{needed - actors:g}, but the local Ray has {num_cpus:g}; lower actors or "
                          "cpus_per_actor (fractions are fine), or raise ray.num_cpus")


def map_stage(ds, stage_cls, model: ModelConfig, **kwargs):
    """A model stage over `ds` on a fixed pool of `model.actors` actors, each loading the model once."""
    return map_actor_pool(ds, stage_cls, {"cfg": model, **kwargs}, model)


def map_actor_pool(ds, actor_cls, constructor_kwargs: dict, pool: ModelConfig):
    """`actor_cls(**constructor_kwargs)` over `ds` on a fixed pool of `pool.actors` actors, each asking what
    `pool` asks (CPUs, GPUs, a tensor-parallel group), batches of `pool.batch_size` rows."""
    placement = {}
    if pool.engine == "vllm" and pool.tensor_parallel_size > 1:
        # vLLM's Ray executor places its shard workers in the placement group its caller runs in: each actor
        # gets a group of one GPU bundle per shard and holds no GPU itself
        placement = {"num_gpus": 0, "ray_remote_args_fn": partial(_tensor_parallel_group, pool)}
    return ds.map_batches(
        actor_cls, fn_constructor_kwargs=constructor_kwargs, batch_format="pyarrow",
        batch_size=pool.batch_size, compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor, **({"num_gpus": pool.gpus_per_actor} | placement),
    )


def shared_pool(models: list[ModelConfig]) -> ModelConfig:
    """What one actor pool running every one of `models` asks (torch engines, the same number of actors): the
    sum of their CPUs and GPUs, the smallest of their batch sizes (each model's memory bound holds)."""
    return dataclasses.replace(models[0], batch_size=min(m.batch_size for m in models),
                               cpus_per_actor=sum(m.cpus_per_actor for m in models),
                               gpus_per_actor=sum(m.gpus_per_actor for m in models))


def _tensor_parallel_group(model: ModelConfig) -> dict:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [{"CPU": model.cpus_per_actor, "GPU": 1.0}] + [{"GPU": 1.0}] * (model.tensor_parallel_size - 1)
    group = placement_group(bundles, strategy="STRICT_PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


# --- resuming: Ray Data's checkpoint records and recovers the writes; mapray skips the written rows itself ---

_PENDING = ".pending.parquet"  # a write's id record before its commit (Ray Data's two-phase commit)


def _committed_files(uri: str) -> tuple[object, list[str]]:
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return fs, []
    # a `.pending.parquet` records a write in progress: Ray Data deletes it and that write's files on recovery
    return fs, [f for f in fs.find(path) if f.endswith(".parquet") and not f.endswith(_PENDING)]


def _finish_cut_short_commits(uri: str) -> None:
    """Ends the commits a crash cut short after their record landed. Ray Data commits a write
    by moving `X.pending.parquet` to `X.parquet`, which on object storage is a copy then a delete: killed between
    the two, both records are there. Its recovery reads any pending record as a write that never finished and
    deletes that write's data files, while the committed record still lists its rows as written, so the rerun
    would skip rows that no longer exist. The copy is whole (an object appears complete or not at all) and the data
    was written before the commit began, so the write is done: the pending record goes, as Ray Data's own commit
    does when it finds both."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return
    files = set(fs.find(path))
    finished = [f for f in files if f.endswith(_PENDING) and f[:-len(_PENDING)] + ".parquet" in files]
    for record in finished:
        fs.rm(record)
    if finished:
        log.info("resuming: %d write(s) the crash caught in their commit were complete, kept", len(finished))


def checkpointed_rows(uri: str) -> int:
    """Rows Ray Data's checkpoint records as written (its committed id files are Parquet)."""
    import pyarrow.parquet as pq

    fs, files = _committed_files(uri)
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)


def written_ids(uri: str, id_column: str) -> pa.Array:
    """The ids of the rows the checkpoint records as written, one array."""
    import pyarrow.parquet as pq

    fs, files = _committed_files(uri)
    chunks = [pq.read_table(f, filesystem=fs, columns=[id_column])[id_column].cast(pa.string()) for f in files]
    return pa.chunked_array(chunks, pa.string()).combine_chunks()


def skip_written(table: pa.Table, id_column: str, written: pa.Array) -> pa.Table:
    """The rows whose id is not among `written`."""
    ids = table[id_column]
    return table.filter(pc.invert(pc.is_in(ids, value_set=written.cast(ids.type))))


class _RecoverOnly(IdColumnCheckpointManager):
    """Ray Data's recovery of a cut-short run (deleting the files of writes whose checkpoint was never
    committed), without its filter: Ray Data would skip the written rows in a pool of actors that ask a whole
    CPU each (fixed in Ray 2.60: `create_checkpoint_filter_op` sets only their memory), which the model actors
    on a small machine never leave free. Returning no ids keeps that operator out of the plan."""

    def load_checkpoint(self, data_file_dir=None, data_file_filesystem=None):
        if data_file_dir is not None:
            self._clean_pending_checkpoints(data_file_dir, data_file_filesystem)
        return None, 0


@contextlib.contextmanager
def checkpointed(path: str, id_column: str):
    """Ray Data's own job checkpointing for the writes inside: each written row's id is recorded under `path`,
    and a rerun recovers the writes a crash cut short. Yields the function that drops the rows an earlier
    attempt wrote from a dataset, in a light task of its own."""
    _finish_cut_short_commits(path)
    written = written_ids(path, id_column)  # committed before this attempt: what recovery keeps
    ctx = ray.data.DataContext.get_current()
    previous = ctx.checkpoint_config
    # kept on success: the staging folder, checkpoint included, goes only once the run is published
    ctx.checkpoint_config = CheckpointConfig(id_column=id_column, checkpoint_path=path,
                                             delete_checkpoint_on_success=False, checkpoint_manager_cls=_RecoverOnly)

    def unwritten(ds):
        if not len(written):
            return ds
        return ds.map_batches(skip_written, fn_kwargs={"id_column": id_column, "written": written},
                              batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)

    try:
        yield unwritten
    finally:
        ctx.checkpoint_config = previous


# --- the watchdog: a run that waits on resources it can never get stops with one line ---

@contextlib.contextmanager
def watched(limit_s: float = STALL_LIMIT_S, ctx: ray.data.DataContext | None = None):
    """Stops an execution with RunStalled once, for `limit_s`, no actor had a batch in hand and nothing moved
    while the run asks Ray for more than the cluster has. A slow batch is an actor at work and a loading model a
    pending actor that fits in the cluster: neither stops a run, however long it takes. Watches the datasets
    made inside (a dataset keeps the DataContext it was made with, as `checkpointed` relies on too), or those of
    `ctx` (a Dataset's own context, for executions the Python API starts on a caller's Dataset)."""
    ctx = ctx or ray.data.DataContext.get_current()
    ctx.set_config(_STALL_LIMIT_KEY, limit_s)
    ctx.custom_execution_callback_classes.append(_Watchdog)
    try:
        yield
    finally:
        ctx.custom_execution_callback_classes.remove(_Watchdog)
        ctx.remove_config(_STALL_LIMIT_KEY)


class _Watchdog(ExecutionCallback):
    """Ray Data calls it at every step of an execution's scheduling loop (it reads the executor's operators,
    Ray Data internals that mapray pins to Ray 2.60); an exception raised here fails the execution."""

    def before_execution_starts(self, executor) -> None:
        self.limit_s = executor._data_context.get_config(_STALL_LIMIT_KEY, STALL_LIMIT_S)
        self.last, self.since = None, time.monotonic()

    def on_execution_step(self, executor) -> None:
        topology = executor._topology or {}
        now, state = time.monotonic(), _progress(topology)
        # an actor with a batch in hand is working, however long a big model takes over it; a task of a task
        # pool may be running or may be waiting in Ray's queue for a CPU, so only movement says it ran
        if state != self.last or any(op.get_actor_info().active for op in topology):
            self.last, self.since = state, now
            return
        if now - self.since >= self.limit_s:
            shortfall = resource_shortfall(topology, ray.cluster_resources())
            if shortfall:
                raise RunStalled(f"no progress for {self.limit_s:g} s: {shortfall}")


def _progress(topology) -> tuple:
    """What moves while a run makes progress (Ray Data's own no-progress measure, plus finished tasks)."""
    return tuple((op.metrics.num_outputs_taken, op.metrics.num_tasks_finished, state.total_enqueued_input_blocks(),
                  state.total_enqueued_output_blocks()) for op, state in topology.items())


_RESOURCES = (("CPU", "cpu"), ("GPU", "gpu"))


def resource_shortfall(topology, capacity: dict) -> str | None:
    """What the operators ask for (their actors, pending ones included, and the next task of each operator
    with input waiting) against the cluster's `capacity` (Ray's resource names); None when it fits."""
    parts, asked = [], dict.fromkeys((name for name, _ in _RESOURCES), 0.0)
    next_task = dict(asked)
    for op, state in topology.items():
        if op.has_completed():
            continue
        held, actors = op.current_logical_usage(), op.get_actor_info()
        if held.cpu or held.gpu:
            count = actors.running + actors.pending + actors.restarting
            holders = _count(count, "actor") if count else _count(op.num_active_tasks(), "task")
            parts.append(f"{op.name}: {holders}, {_fmt(held)}")
            for name, attr in _RESOURCES:
                asked[name] += getattr(held, attr)
        task = op.incremental_resource_usage()
        if state.has_pending_bundles() and (task.cpu or task.gpu):
            parts.append(f"{op.name}: its next task, {_fmt(task)}")
            for name, attr in _RESOURCES:
                next_task[name] = max(next_task[name], getattr(task, attr))
    short = [name for name in asked if asked[name] + next_task[name] > capacity.get(name, 0.0) + 1e-9]
    if not short:
        return None
    wanted = ", ".join(f"{n} {asked[n] + next_task[n]:g}" for n in short)
    has = ", ".join(f"{n} {capacity.get(n, 0.0):g}" for n in short)
    return (f"Ray cannot schedule what this run asks for: {wanted} asked ({'; '.join(parts)}), {has} in the "
            "cluster; lower a model's actors, cpus_per_actor or gpus_per_actor, or give Ray more")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _fmt(res) -> str:
    return ", ".join(f"{name} {getattr(res, attr):g}" for name, attr in _RESOURCES if getattr(res, attr))
