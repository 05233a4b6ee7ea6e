"""Faults done for real on a local Ray: a model actor SIGKILLed in the middle of a run."""

import collections
import json

import pyarrow.parquet as pq

from mapray.config import load_config
from mapray.pipeline import score
from mapray.testing.faults import ActorKiller
from tests.conftest import UF


def test_actor_killed_mid_run_every_pair_exactly_once(tmp_path, tiny, local_ray):
    lines = UF.read_bytes().splitlines()[:160]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # keep_end: with keep_start, rows whose prompt alone fills max_length (22 of these 160) would be set aside
    model = {"path": tiny["policy"], "max_length": 1024, "truncation_mode": "keep_end", "token_budget": 4096,
             "batch_size": 4, "cpus_per_actor": 0.5}
    cfg = load_config(None, base={"input": {"uri": str(tmp_path / "in.jsonl"), "columns": {"id": "prompt_id"}},
                                  "output": str(tmp_path / "out"), "policy": model})
    killer = ActorKiller("MapBatches(LogprobStage)", after_s=4.0)
    killer.start()
    manifest = score(cfg)
    killer.join(timeout=1)
    assert killer.killed is not None, "the run ended before the actor could be killed: make it longer"
    ids = pq.read_table(tmp_path / "out" / "scored").column("pair_id").to_pylist()
    expected = [json.loads(x)["prompt_id"] for x in lines]
    assert collections.Counter(ids) == collections.Counter(expected)  # none missing, none twice
    assert manifest["counts"]["scored"] == 160


DRIVER = """
import time
from mapray.runtime import ensure_ray
ensure_ray()
print("started", flush=True)
time.sleep(600)
"""


def test_a_driver_killed_outright_leaves_no_ray_process_behind(tmp_path):
    """SIGKILL to the driver alone, as the OOM killer sends it: Ray's agents of its embedded local Ray would stay a
    minute or more; the watcher (`mapray.reaper`) ends them within seconds. Run beside the suite's own Ray, with the
    suite's environment: the second Ray on a machine, as a user's test would start it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mapray.reaper import descendants, start_time

    def ray_agents() -> dict[int, str]:
        under_driver = descendants({driver.pid})
        return {pid: started for pid, started in under_driver.items()
                if b"Agent" in Path(f"/proc/{pid}/cmdline").read_bytes()}

    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, cwd=tmp_path)
    try:
        assert driver.stdout.readline().strip() == "started", "the driver did not start its Ray"
        deadline = time.monotonic() + 90  # Ray starts its agents a moment after its raylet (long on a busy machine)
        while len(agents := ray_agents()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(agents) == 2, f"the DashboardAgent and RuntimeEnvAgent to watch, found {agents}"
        time.sleep(2)  # the watcher notes them (every second at first)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()

    def left() -> list[int]:
        return [pid for pid, started in agents.items() if start_time(pid) == started]

    deadline = time.monotonic() + 20
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), "Ray's agents outlived their driver"
