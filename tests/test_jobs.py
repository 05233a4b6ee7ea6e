"""jobs/score.py submitted for real: a Ray head on loopback, Ray's job submission client, outputs checked."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mapray.testing.faults import kill_with_its_local_ray
from tests.conftest import UF

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A separate Ray head (`ray start --head --block` in its own process group, so stopping it cannot touch
    the test session's own local Ray)."""
    gcs, dashboard = _free_port(), _free_port()
    # every port the head opens picked free: the test session's own local Ray already holds the defaults
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    bin_dir = Path(sys.executable).parent  # jobs run `python`: this environment's, as a cluster image's would
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ray_cli = str(bin_dir / "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        try:
            client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
            client.list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                raise
            time.sleep(1)
    yield client
    # the head and every process under it, SIGKILLed: after a SIGTERM `ray start --block` took 30 s to exit, and
    # nothing here needs a graceful stop
    kill_with_its_local_ray(head)


def _submit_when_ready(client, **kwargs) -> str:
    """The head's job agent registers a few seconds after the dashboard answers."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_score_job_submitted_to_a_ray_head(ray_head, tmp_path, tiny):
    from ray.job_submission import JobStatus

    lines = UF.read_bytes().splitlines()[:12]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "run.yaml").write_text(json.dumps({
        "input": {"uri": str(tmp_path / "in.jsonl"), "columns": {"id": "prompt_id"}},
        "output": str(tmp_path / "out"),
        # keep_end: with keep_start, rows whose prompt alone fills max_length (6 of these 12) would be set aside
        "policy": {"path": tiny["policy"], "max_length": 256, "truncation_mode": "keep_end", "token_budget": 4096,
                   "cpus_per_actor": 0.5},
        "selection": {"top_k": 3},
    }))
    job_id = _submit_when_ready(
        ray_head,
        entrypoint=f"python jobs/score.py --config {tmp_path / 'run.yaml'}",
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv/", ".git/", ".gpu-bundle/", "out/", "*.pyc"],
                     "env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    deadline = time.monotonic() + 240
    while (status := ray_head.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                              JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in time"
        time.sleep(1)
    logs = ray_head.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "mapray: 12 input pairs -> 12 scored, 0 rejected, 3 selected (map_z)" in logs
    assert "Started a local Ray instance" not in logs  # it joined the head instead of starting its own
    assert pq.read_table(tmp_path / "out" / "selected").num_rows == 3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["scored"] == 12
