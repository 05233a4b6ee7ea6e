"""A multi-node Ray cluster on one machine, for tests: Ray's own `cluster_utils.Cluster` (a head and worker
nodes, each its own raylet and object store), nodes lost and added for real, and what Ray's control store (the
GCS) records about where each actor ran and what it held.

The test process never joins the cluster (its own session Ray may be running): a scoring run is a
`mapray score` subprocess given the cluster's address, the way a user submits to a cluster; the driver attaches
to the head, which, as in deploy/kuberay/raycluster.yaml, has no CPUs, so every task and actor runs on a worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

SYSTEM_CONFIG = {
    # a node lost is noticed within ~1.5 s (Ray's default: 5 health checks 3 s apart after a 5 s delay)
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
    # no worker processes started ahead of need on every node for every driver: on 2 cores each costs a second
    "prestart_worker_first_driver": False, "enable_worker_prestart": False,
}
STORE_BYTES = 80 << 20  # each node's object store: small, the tests' blocks are a few KiB


@dataclass
class ActorRecord:
    """One actor as the GCS records it, alive or dead."""

    actor_id: str
    job_id: str
    class_name: str
    state: str
    node_id: str
    pid: int
    restarts: int
    asked: dict[str, float]  # what it asked for (num_cpus, num_gpus, ...), in a placement group or not
    held: dict[str, list[int]] = field(default_factory=dict)  # which unit of each resource it held (GPU ids)
    earlier_nodes: list[str] = field(default_factory=list)  # where its earlier incarnations ran
    placement_group: str = ""  # the group it was placed in, if any


@dataclass
class TaskRecord:
    """One attempt of a task as the GCS records it."""

    task_id: str
    name: str
    node_id: str  # empty if it never got a node
    attempt: int
    state: str  # the latest recorded: FINISHED, FAILED, RUNNING, ...
    actor_id: str  # the actor it ran on (its creation included); empty for a plain task


def _resource(name: str) -> str:
    """Ray's name for a resource inside a placement group (`GPU_group_1_<group id>`, `GPU_group_<group id>`)
    back to the resource's own (`GPU`); `bundle` for the groups' own bookkeeping."""
    return name.split("_group_", 1)[0]


def _by_resource(items) -> dict[str, float]:
    asked: dict[str, float] = {}
    for name, amount in items:
        if _resource(name) != "bundle":
            asked[_resource(name)] = max(asked.get(_resource(name), 0.0), amount)
    return asked


def _held(mapping) -> dict[str, list[int]]:
    held: dict[str, set[int]] = {}
    for entry in mapping:
        if _resource(entry.name) != "bundle":
            held.setdefault(_resource(entry.name), set()).update(r.index for r in entry.resource_ids)
    return {name: sorted(ids) for name, ids in held.items()}


class LocalCluster:
    """A head with no CPUs and worker nodes added and killed at will."""

    def __init__(self, system_config: dict | None = None):
        from ray.cluster_utils import Cluster

        self.shapes: dict[str, dict] = {}  # worker node id -> the shape it was started with
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": STORE_BYTES,
            "_system_config": {**SYSTEM_CONFIG, **(system_config or {})}})

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def head_id(self) -> str:
        return self.cluster.head_node.node_id

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def add_worker(self, num_cpus: int = 2, num_gpus: int = 0, wait: bool = True):
        """A worker node with its own raylet and object store; returns Ray's `Node` (`.node_id` is its id)."""
        node = self.cluster.add_node(num_cpus=num_cpus, num_gpus=num_gpus, wait=wait, object_store_memory=STORE_BYTES)
        self.shapes[node.node_id] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        return node

    def set_workers(self, *shapes: dict) -> list:
        """Makes the live workers these shapes (`add_worker` keywords): keeps the ones that fit, kills the
        others, starts the missing ones. Returns the worker nodes."""
        wanted, kept = list(shapes), []
        for node in self.workers:
            if self.shapes[node.node_id] in wanted:
                wanted.remove(self.shapes[node.node_id])
                kept.append(node)
            else:
                self.kill(node)
        nodes = kept + [self.add_worker(**shape) for shape in wanted]
        self.wait_for_live(1 + len(shapes))
        return nodes

    @staticmethod
    def raylet_pid(node) -> int:
        import ray._private.ray_constants as rc

        return node.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid

    def kill(self, node) -> None:
        """A node lost for real: its raylet, object store and workers SIGKILLed at once (no draining)."""
        self.cluster.remove_node(node, allow_graceful=False)

    def live_nodes(self) -> dict[str, dict[str, float]]:
        """Node id -> total resources, for the nodes the GCS has alive."""
        return {n["NodeID"]: n["Resources"] for n in self.cluster.global_state.node_table() if n["Alive"]}

    def wait_for_live(self, count: int, timeout_s: float = 30.0) -> None:
        """Waits until the GCS counts `count` live nodes (a killed node is marked dead after its health checks)."""
        deadline = time.monotonic() + timeout_s
        while len(self.live_nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.live_nodes())} live nodes, expected {count}")
            time.sleep(0.1)

    def actors(self, class_contains: str = "", job_id: str | None = None) -> list[ActorRecord]:
        """The actors (dead ones included) whose class name contains `class_contains`, of one job or all."""
        from ray.core.generated import gcs_pb2

        accessor = self.cluster.global_state._connect_and_get_accessor()
        records = []
        for raw in accessor.get_actor_table(None, None):
            data = gcs_pb2.ActorTableData.FromString(raw)
            if class_contains not in data.class_name or job_id not in (None, data.job_id.hex()):
                continue
            records.append(ActorRecord(
                actor_id=data.actor_id.hex(), job_id=data.job_id.hex(), class_name=data.class_name,
                state=gcs_pb2.ActorTableData.ActorState.Name(data.state), node_id=data.address.node_id.hex(),
                pid=data.pid, restarts=data.num_restarts, asked=_by_resource(data.required_resources.items()),
                held=_held(data.resource_mapping),
                earlier_nodes=[i.node_id.hex() for i in data.previous_incarnations],
                placement_group=data.placement_group_id.hex()))
        return records

    def tasks(self, job_id: str | None = None) -> list[TaskRecord]:
        """Every task attempt of one job (or all) as Ray's task events in the GCS record it: where it ran and how
        it ended, e.g. `MapWorker(MapBatches(LogprobStage)).submit` FINISHED on a node: that node's actor did work."""
        from ray.core.generated import common_pb2

        records = []
        for event in self.cluster.global_state._get_all_task_events():
            if job_id not in (None, event.job_id.hex()):
                continue
            info, update = event.task_info, event.state_updates
            states = dict(update.state_ts_ns)
            last = max(states, key=states.get) if states else common_pb2.TaskStatus.NIL
            records.append(TaskRecord(task_id=event.task_id.hex(), name=info.name, node_id=update.node_id.hex(),
                                      attempt=event.attempt_number, state=common_pb2.TaskStatus.Name(last),
                                      actor_id=info.actor_id.hex()))
        return records

    def jobs(self) -> list[tuple[str, str]]:
        """(job id, the node its driver attached to) of every job, in the order they started."""
        from ray.core.generated import gcs_pb2

        accessor = self.cluster.global_state._connect_and_get_accessor()
        jobs = sorted((gcs_pb2.JobTableData.FromString(raw) for raw in accessor.get_job_table(
            skip_submission_job_info_field=True, skip_is_running_tasks_field=True)), key=lambda j: j.start_time)
        return [(job.job_id.hex(), job.driver_address.node_id.hex()) for job in jobs]

    def submit(self, args: list[str], module: str = "mapray", env: dict | None = None, **popen) -> subprocess.Popen:
        """`python -m MODULE ARGS` as a driver of this cluster (RAY_ADDRESS), in its own process group."""
        env = dict(os.environ, **(env or {}), RAY_ADDRESS=self.address, RAY_AUTH_MODE="disabled")
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, start_new_session=True, **popen)

    def shutdown(self) -> None:
        self.cluster.shutdown()


# --- tensor-parallel placement on fake GPUs: what vLLM's Ray executor does inside a stage's placement group ---

class TensorParallelShard:
    """One shard worker of a tensor-parallel model: holds one GPU of its stage's placement group."""

    def ready(self) -> bool:
        return True


class ShardedStage:
    """Stands in for a vLLM stage with tensor_parallel_size > 1: starts one shard actor per bundle of the
    placement group its actor runs in, each asking one GPU, as vLLM's Ray executor places its workers; batches
    pass through unchanged. No model loads, so fake GPUs are enough."""

    def __init__(self, cfg):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.get_current_placement_group()
        shard = ray.remote(num_cpus=0, num_gpus=1)(TensorParallelShard)
        self.shards = [shard.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i)).remote() for i in range(cfg.tensor_parallel_size)]
        ray.get([s.ready.remote() for s in self.shards])

    def __call__(self, batch):
        return batch


def run_sharded_stage(tensor_parallel_size: int, actors: int, rows: int = 8) -> int:
    """Driver side: `ShardedStage` mapped by mapray's own `map_stage` (vLLM engine) over `rows` rows."""
    import ray.data

    from mapray.config import ModelConfig
    from mapray.runtime import map_stage

    ray.init(address=os.environ["RAY_ADDRESS"])
    model = ModelConfig(path="-", engine="vllm", tensor_parallel_size=tensor_parallel_size, actors=actors,
                        cpus_per_actor=0.5, batch_size=2)
    ds = map_stage(ray.data.range(rows, override_num_blocks=rows // 2), ShardedStage, model)
    return ds.count()


if __name__ == "__main__":  # python -m mapray.testing.cluster TENSOR_PARALLEL_SIZE ACTORS
    print(run_sharded_stage(int(sys.argv[1]), int(sys.argv[2])))
