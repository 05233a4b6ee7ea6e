"""mapray: distributed batch scoring of preference pairs by alignment potential (MAP) on Ray.

The Python API (`mapray.api`): `Scorer(config)(ds)` scores a Ray Dataset of pairs, `select` keeps the top of the
pool, `split_rejects` separates the rows set aside, `make_report` looks at a selection. The configs are
`mapray.config`'s; `load_config` reads the YAML `mapray score` reads. `diff(old, new)` tells what changed between
two runs' selections (`mapray.changes`).
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {"Scorer": "mapray.api", "select": "mapray.api", "split_rejects": "mapray.api", "make_report": "mapray.api",
        "load_config": "mapray.config", "ConfigError": "mapray.errors", "Combination": "mapray.ensemble",
        "diff": "mapray.changes"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    """The API's names, imported when first used: `import mapray` stays light (no Ray) for the command line."""
    if name not in _API:
        raise AttributeError(f"module 'mapray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
