"""The embedded local Ray mapray starts: every worker process gets the run's environment variables."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, os, ray
from mapray.config import RayConfig
from mapray.runtime import ensure_ray
ensure_ray(RayConfig(num_cpus=1, env_vars={"MAPRAY_TEST_SETTING": "from-config", "VLLM_LOGGING_LEVEL": "DEBUG"}))
names = ["MAPRAY_TEST_SETTING", "VLLM_LOGGING_LEVEL", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_DISABLE_PROGRESS_BARS",
         "VLLM_ATTENTION_BACKEND", "VLLM_ENABLE_V1_MULTIPROCESSING"]
seen = ray.get(ray.remote(lambda: {n: os.environ.get(n) for n in names}).remote())
print(json.dumps(seen))
"""


def test_a_local_rays_workers_get_the_configured_variables_and_the_drivers():
    # the driver's own VLLM_* settings reach the workers; ray.env_vars wins over mapray's defaults and the driver's;
    # vLLM's engine runs inside each actor (the suite sets that for its own process: dropped here)
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env.update(VLLM_ATTENTION_BACKEND="TORCH_SDPA", VLLM_LOGGING_LEVEL="INFO")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "MAPRAY_TEST_SETTING": "from-config", "VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "VLLM_ATTENTION_BACKEND": "TORCH_SDPA",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
