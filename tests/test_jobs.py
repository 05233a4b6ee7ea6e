"""jobs/score.py submitted for real: a Ray head on loopback, Ray's job submission client, outputs checked."""

import contextlib
import json
import os
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


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free now: probed with every socket held at once (probes one at a time can be handed
    the same port twice, and `ray start` refuses a head whose ports collide)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(n)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
         "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")


def _start_head(log: Path):
    """`ray start --head --block` in its own process group (stopping it cannot touch the test session's own
    local Ray), every port it opens picked free (the session's Ray already holds the defaults), its output in
    `log`. Returns the process and a client of its job API once that answers, or None if the head exited first
    (a port taken between the probe and the start)."""
    from ray.job_submission import JobSubmissionClient

    ports = dict(zip(PORTS, _free_ports(len(PORTS))))
    bin_dir = Path(sys.executable).parent  # jobs run `python`: this environment's, as a cluster image's would
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with open(log, "ab") as out:
        head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "true",
                                 "--disable-usage-stats", *(f"--{name}={port}" for name, port in ports.items())],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while head.poll() is None:
        try:
            client = JobSubmissionClient(f"http://127.0.0.1:{ports['dashboard-port']}")
            client.list_jobs()
            return head, client
        except Exception:
            if time.monotonic() > deadline:
                kill_with_its_local_ray(head)
                raise
            time.sleep(1)
    return head, None


@pytest.fixture
def ray_head(tmp_path):
    """A separate Ray head and a job client of it; started once more if it exits before answering."""
    log = tmp_path / "ray-head.log"
    for _ in range(2):
        head, client = _start_head(log)
        if client is not None:
            break
    assert client is not None, f"ray start --head exited ({head.returncode}): {log.read_text()[-3000:]}"
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
