"""The driver SIGKILLed in the middle of a run, then the same command run again: it resumes from Ray Data's
checkpoint, recomputes only rows not yet written, and every pair comes out exactly once."""

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.conftest import UF

N = 120


def _checkpointed_ids(staging: Path) -> int:
    files = list(staging.glob("run-*/checkpoint/**/*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


def test_driver_killed_mid_run_resumes(tmp_path, tiny):
    lines = UF.read_bytes().splitlines()[:N]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    (tmp_path / "run.yaml").write_text(json.dumps({
        "input": {"uri": str(tmp_path / "in.jsonl"), "columns": {"id": "prompt_id"}},
        "output": str(out),
        "policy": {"path": tiny["policy"], "max_length": 1024, "token_budget": 4096, "batch_size": 4,
                   "cpus_per_actor": 0.5},
    }))
    command = [sys.executable, "-m", "mapray", "score", "--config", str(tmp_path / "run.yaml")]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)  # its own process group: the local Ray dies with it
    deadline = time.monotonic() + 240
    while _checkpointed_ids(out / "_staging") < 8 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed: make it longer"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = _checkpointed_ids(out / "_staging")
    assert 0 < done_before < N and not (out / "manifest.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    ids = pq.read_table(out / "scored").column("pair_id").to_pylist()
    assert collections.Counter(ids) == collections.Counter(json.loads(x)["prompt_id"] for x in lines)
    assert manifest["resumed"] is True and manifest["counts"]["scored"] == N
    recomputed = manifest["counts"]["scored_this_attempt"]
    print(f"resume: {done_before} of {N} rows were checkpointed before the kill; the rerun scored {recomputed}")
    assert recomputed <= N - done_before + 8  # at most the batches in flight at the kill are scored twice
    assert not list((out / "_staging").glob("run-*"))  # staging removed once published
