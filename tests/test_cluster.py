"""mapray on a Ray cluster of several nodes on this machine (mapray/testing/cluster.py: a head with no CPUs and
worker nodes with fake GPUs, each its own raylet and object store). A worker node lost while the model stages
run; a node added mid-run, then one lost during that run's global pass: every pair comes out exactly once, with
the values of a clean run of the same config. And the placement deploy/ asks for: one model actor per GPU, a
tensor-parallel model's shards within one node. Every run on the cluster is a `mapray score` subprocess
submitted to the cluster's address; this test process never joins the cluster (the clean run is the same config
on the suite's own local Ray: where an actor runs changes no value)."""

import collections
import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mapray.config import load_config
from mapray.pipeline import score
from mapray.runtime import checkpointed_rows
from mapray.testing.cluster import LocalCluster
from mapray.testing.compare import assert_same_rows
from mapray.testing.faults import catch_task, wait_until, worker_titles
from tests.conftest import UF

N = 60
# Three fake GPUs a worker: the three model actors fit on either worker alone, so the actors of a lost node have
# somewhere to come back; two CPUs: the three half-CPU actors and the two light tasks beside them.
WORKER = {"num_cpus": 2, "num_gpus": 3}
MODEL = {"max_length": 1024, "token_budget": 4096, "batch_size": 4, "cpus_per_actor": 0.5, "gpus_per_actor": 1,
         "device": "cpu"}
# Ray Data's defaults for big data cost minutes on 2 cores and change no value: a pool of 32 actors (32 processes)
# to read each Parquet folder's footers, and 200 partitions for each shuffle (the global pass's duplicate count
# and sort); 1 footer reader and 2 partitions do for these 60 rows.
ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1", "RAY_DATA_DEFAULT_MIN_PARALLELISM": "2"}
RUN_S = 900  # a test's bound: its run and, run alone, the cluster's start and the clean run (~6 min at load 40)
STAGES = {"MapWorker(MapBatches(RewardStage))": "reward", "MapWorker(MapBatches(LogprobStage))": "logps"}


@dataclass
class Job:
    """The one input and config every run here scores; only the output folder changes."""

    tiny: dict
    rows: Path
    ids: list[str]

    def config(self, out: Path) -> Path:
        models = {"policy": {"path": self.tiny["policy"], **MODEL},
                  "reference": {"path": self.tiny["reference"], **MODEL},
                  "reward": {"source": "model", "model": {"path": self.tiny["reward"], **MODEL}}}
        cfg = {"input": {"uri": str(self.rows), "columns": {"id": "prompt_id"}}, "output": str(out), **models,
               "metric": {"implicit": "dpo"}, "selection": {"ratio": 0.5}}
        path = out.with_suffix(".yaml")
        path.write_text(json.dumps(cfg))
        return path


@dataclass
class Attempt:
    """One `mapray score` driver on the cluster, and the Ray job it became."""

    proc: subprocess.Popen
    job_id: str
    out: Path
    workers: set[str] = field(default_factory=set)  # the worker nodes' ids when it started


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny) -> Job:
    lines = UF.read_bytes().splitlines()[:N]
    rows = tmp_path_factory.mktemp("input") / "in.jsonl"
    rows.write_bytes(b"\n".join(lines) + b"\n")
    return Job(tiny, rows, [json.loads(x)["prompt_id"] for x in lines])


@pytest.fixture(scope="module")
def clean(job, tmp_path_factory, local_ray) -> Path:
    """The output every fault run is compared with: the same config, nothing lost, nothing added, run on the
    suite's local Ray (no GPUs there: the actors ask for none; which node or GPU an actor holds changes no value)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    cfg = json.loads(job.config(out).read_text())
    for model in (cfg["policy"], cfg["reference"], cfg["reward"]["model"]):
        model["gpus_per_actor"] = 0
    score(load_config(None, base=cfg))
    return out


def _start(cluster: LocalCluster, job: Job, out: Path) -> Attempt:
    config = job.config(out)
    known = {job_id for job_id, _ in cluster.jobs()}
    with open(out.with_suffix(".log"), "ab") as log:
        proc = cluster.submit(["score", "--config", str(config)], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    job_id = wait_until(lambda: [j for j, _ in cluster.jobs() if j not in known] or proc.poll() is not None,
                        "the driver to join the cluster", timeout_s=RUN_S)
    assert proc.poll() is None, _log_tail(out)
    return Attempt(proc, job_id[0], out, {w.node_id for w in cluster.workers})


def _wait(attempt: Attempt) -> int:
    return attempt.proc.wait(timeout=RUN_S)


def _log_tail(out: Path) -> str:
    """The end of a run's output (its driver's stdout and stderr), for a failure message."""
    return out.with_suffix(".log").read_text(errors="replace")[-4000:]


def _written(out: Path) -> int:
    """Rows the run's checkpoint records as written to staged rows/."""
    return sum(checkpointed_rows(str(p)) for p in out.glob("_staging/run-*/checkpoint"))


def _model_actors(cluster: LocalCluster, job_id: str) -> list:
    return [a for a in cluster.actors("MapWorker(MapBatches(", job_id) if a.class_name in STAGES]


def _is_batch(task_name: str) -> bool:
    """A batch sent to a model stage's actor (Ray Data's `MapWorker(MapBatches(Stage)).submit`)."""
    return task_name in {f"{name}.submit" for name in STAGES}


def _assert_each_pair_once_as_in_the_clean_run(out: Path, clean: Path, ids: list[str]) -> None:
    scored, fresh = (pq.read_table(p / "scored").sort_by("pair_id") for p in (out, clean))
    rejects, fresh_rejects = (pq.read_table(p / "rejects").sort_by("pair_id") for p in (out, clean))
    # none missing, none twice: scored/ and rejects/ together hold the input's pairs
    assert collections.Counter(scored["pair_id"].to_pylist() + rejects["pair_id"].to_pylist()) == \
        collections.Counter(ids)
    assert scored.num_rows > len(ids) // 2  # most pairs reach every model: the value check below has teeth
    # a run whose actors were missing for a while batches some rows differently from the clean run
    assert_same_rows(scored, fresh, {"chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                                     "reward_chosen", "reward_rejected", "explicit_margin", "implicit_margin", "map_z"})
    assert rejects.select(["pair_id", "reason", "stage"]).equals(fresh_rejects.select(["pair_id", "reason", "stage"]))
    counts = [json.loads((p / "manifest.json").read_text())["counts"] for p in (out, clean)]
    assert [{k: c[k] for k in ("input", "scored", "rejected", "selected")} for c in counts] == \
        [{k: counts[1][k] for k in ("input", "scored", "rejected", "selected")}] * 2


def _on(node_id: str, records) -> list:
    return [r for r in records if r.node_id == node_id]


# --- placement: what deploy/ asks for, on fake GPUs (and one model actor per GPU: the node-added run) ---

@pytest.mark.timeout(300)
def test_tensor_parallel_shards_stay_within_one_node(cluster, tmp_path):
    # 3 GPUs a node, 2 groups of 2 shards: the groups cannot share a node, and a group not packed could straddle
    cluster.set_workers(WORKER, WORKER)
    known = {job_id for job_id, _ in cluster.jobs()}
    proc = cluster.submit(["2", "2"], module="mapray.testing.cluster", env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    output, errors = proc.communicate(timeout=240)
    assert proc.returncode == 0 and output.split() == ["8"], (output + errors)[-3000:]  # every row went through
    (job_id,) = [j for j, _ in cluster.jobs() if j not in known]
    stages, shards = cluster.actors("ShardedStage", job_id), cluster.actors("TensorParallelShard", job_id)
    assert len(stages) == 2 and len(shards) == 4
    for stage in stages:
        group = [s for s in shards if s.placement_group == stage.placement_group]
        assert len(group) == 2 and {s.node_id for s in group} == {stage.node_id}  # the whole group on one node
        assert stage.asked == {"CPU": 0.5} and "GPU" not in stage.held  # the stage actor holds no GPU itself
        assert all(s.asked == {"GPU": 1.0} and len(s.held["GPU"]) == 1 for s in group)
    gpus = [(s.node_id, s.held["GPU"][0]) for s in shards]
    assert len(set(gpus)) == 4


# --- faults ---

@pytest.mark.timeout(RUN_S)
def test_a_worker_node_lost_while_the_model_stages_run(cluster, job, clean, tmp_path):
    raylets = {w.node_id: cluster.raylet_pid(w) for w in cluster.set_workers(WORKER, WORKER)}
    attempt = _start(cluster, job, tmp_path / "out")
    seen: dict[int, str] = {}  # model actor process -> its node, once seen running a batch

    def all_at_work():  # each of the three model actors seen running a batch: every stage is under way
        for node_id, raylet_pid in raylets.items():
            seen.update({pid: node_id for pid, title in worker_titles(raylet_pid).items() if _is_batch(title[5:])})
        return len(seen) == 3 or attempt.proc.poll() is not None

    wait_until(all_at_work, "every model stage at work", timeout_s=RUN_S, poll_s=0.05)
    assert attempt.proc.poll() is None and _written(attempt.out) < N, "the run ended before the node could be lost"
    victim = collections.Counter(seen.values()).most_common(1)[0][0]
    actors = [a for a in _model_actors(cluster, attempt.job_id) if a.state == "ALIVE"]
    lost = {a.actor_id for a in _on(victim, actors)}
    cluster.kill(next(w for w in cluster.workers if w.node_id == victim))
    # survived in the run itself: Ray restarts the lost actors on the other node, Ray Data resubmits their batches
    assert _wait(attempt) == 0, _log_tail(attempt.out)
    manifest = json.loads((attempt.out / "manifest.json").read_text())
    assert manifest["resumed"] is False and manifest["counts"]["model_pass_rows_this_attempt"] == N
    # the batches its actors had in hand failed with it; those actors came back on the other node
    tasks = cluster.tasks(attempt.job_id)
    in_hand = {t.actor_id for t in _on(victim, tasks) if t.state == "FAILED" and _is_batch(t.name)}
    assert in_hand and in_hand <= lost
    for a in _model_actors(cluster, attempt.job_id):
        if a.actor_id in in_hand:
            assert a.restarts == 1 and a.earlier_nodes == [victim] and a.node_id in attempt.workers - {victim}, a
    _assert_each_pair_once_as_in_the_clean_run(attempt.out, clean, job.ids)


@pytest.mark.timeout(RUN_S)
def test_a_node_added_mid_run_takes_work_and_one_lost_during_the_global_pass(cluster, job, clean, tmp_path):
    """One run, two events (each run on the cluster costs a minute of the suite): a node joins while a model actor
    waits for a GPU and takes that actor's work; then, in the global pass, the node running a write is lost and
    Ray does that write again on the other node."""
    (first,) = cluster.set_workers({"num_cpus": 2, "num_gpus": 2})  # room for two of the three model actors
    attempt = _start(cluster, job, tmp_path / "out")

    def waiting():  # two model actors up, the third waiting for a GPU: the run asks for a node
        actors = _model_actors(cluster, attempt.job_id)
        pending = [a for a in actors if a.state == "PENDING_CREATION"]
        ready = len(pending) == 1 and sum(a.state == "ALIVE" for a in actors) == 2
        return pending if ready else attempt.proc.poll() is not None

    pending = wait_until(waiting, "a model actor waiting for a GPU", timeout_s=RUN_S, poll_s=0.5)
    assert attempt.proc.poll() is None, _log_tail(attempt.out)
    added = cluster.add_worker(**WORKER)
    # scored/ is made once the selection's sort has found its cut-off, right before the writes
    wait_until(lambda: list(attempt.out.glob("_staging/run-*/scored")) or attempt.proc.poll() is not None,
               "the global pass to reach its writes", timeout_s=RUN_S)
    # the node that runs a write is lost in the middle of it
    caught = catch_task({w.node_id: cluster.raylet_pid(w) for w in (first, added)}, lambda title: "Write" in title,
                        stop=lambda: attempt.proc.poll() is not None, timeout_s=RUN_S)
    assert caught, "the run ended before a write could be caught"
    victim, pid, _ = caught
    cluster.kill(first if first.node_id == victim else added)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    assert not (attempt.out / "manifest.json").exists()
    # survived in the run itself: Ray does the lost write again elsewhere
    assert _wait(attempt) == 0, _log_tail(attempt.out)
    lost = [t for t in _on(victim, cluster.tasks(attempt.job_id)) if t.state == "FAILED" and "Write" in t.name]
    assert lost, "no write failed with the node"

    actors = _model_actors(cluster, attempt.job_id)
    (now,) = [a for a in actors if a.actor_id == pending[0].actor_id]
    assert now.node_id == added.node_id and now.restarts == 0  # it started there and stayed
    # the placement deploy/ asks for: the driver on the head, one model actor per GPU on the worker nodes
    assert dict(cluster.jobs())[attempt.job_id] == cluster.head_id
    assert collections.Counter(STAGES[a.class_name] for a in actors) == {"reward": 1, "logps": 2}
    for a in actors:  # the model pass was over when the node went: no model actor was lost with it
        assert a.asked == {"CPU": 0.5, "GPU": 1.0} and len(a.held["GPU"]) == 1 and a.restarts == 0, a
        assert a.node_id in {first.node_id, added.node_id}, a
    gpus = [(a.node_id, a.held["GPU"][0]) for a in actors]
    assert len(set(gpus)) == len(gpus)  # never two on one GPU
    # and it worked there: its stage's batches finished on the new node
    done = [t for t in _on(added.node_id, cluster.tasks(attempt.job_id)) if t.state == "FINISHED" and _is_batch(t.name)]
    assert done and {t.actor_id for t in done} == {now.actor_id}
    _assert_each_pair_once_as_in_the_clean_run(attempt.out, clean, job.ids)
