"""`mapray report OUT`: a look at a finished output before anyone trains on it.

`report` reads manifest.json, computes the numbers with Ray Data passes over scored/ (compute.py: counts, the
cut-off, the alpha sweep, the overlap of the selection under every metric, length bias, the noise audit, a
per-group breakdown), draws the figures (figures.py) and writes OUT/report/: `index.html` (one self-contained
page, page.py), `report.json` and the figures as PNG. `summary` gives the same numbers to `mapray show`, reusing
a report.json of the same run and settings when there is one. `report_rows` computes them for a Dataset the
Python API selected (`mapray.api.select`). No model runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time

import fsspec
import numpy as np

from mapray.config import RayConfig
from mapray.errors import ConfigError
from mapray.report.settings import ReportSettings
from mapray.uris import absolute

__all__ = ["ReportSettings", "report", "report_rows", "summary"]
RUN_KEYS = ("run_id", "finished_at", "reselected_at", "config", "models", "libraries", "tokenization", "counts",
            "selection", "pool_moments", "warnings", "timings")  # what report.json repeats from the manifest


def report(uri: str, settings: ReportSettings | None = None) -> dict:
    """Writes OUT/report/{index.html, report.json, *.png} for the published output at `uri`; returns the
    numbers."""
    settings = settings or ReportSettings()
    _check_figures()
    uri = absolute(uri).rstrip("/")
    started = time.time()
    numbers, sample = _compute(uri, settings)
    write(numbers, sample, f"{uri}/report", started)
    return numbers


def report_rows(rows, selection, settings: ReportSettings | None = None, out: str | None = None) -> dict:
    """The report of a selected Dataset (`mapray.api.select`'s rows and decision: scored rows, and rows set
    aside with their reasons); written to the folder `out` (index.html, report.json, the figures) when given."""
    from mapray import columns as C
    from mapray.groups import check_group_column
    from mapray.public_rows import good, reject_rows
    from mapray.report.compute import compute_rows, needed

    settings = by_group_of_run(settings or ReportSettings(), selection.config.by)
    settings.check()
    if out is not None:
        _check_figures()
    started = time.time()
    schema = rows.schema()
    check_group_column(schema.base_schema, settings.by, "--by", "scored/")
    rejects = None
    if C.REJECT_REASON in schema.names:
        rejects = rows.map_batches(reject_rows, batch_format="pyarrow").select_columns(["reason", "stage", "source"])
        rows = rows.map_batches(good, batch_format="pyarrow")
    numbers, sample = compute_rows(rows.select_columns(needed(settings, schema.names)), rejects, selection.config,
                                   selection.alpha, selection.count, settings)
    numbers["run"] = {"selection": selection.summary(), "pool_moments": None}
    numbers["output"] = out or ""
    if out is not None:
        write(numbers, sample, out, started)
    return numbers


def _check_figures() -> None:
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: say so before Ray starts
        raise ConfigError("mapray report draws its figures with matplotlib: pip install 'mapray[report]'")


def write(numbers: dict, sample, folder: str, started: float) -> None:
    """The figures, then index.html and report.json into `folder` (emptied first: an earlier report's figures,
    a --by chart, must not outlive it)."""
    computed_at = time.time()
    from mapray.report import figures, page

    images = figures.render(numbers, sample)
    numbers["timings"] = {"compute_s": round(computed_at - started, 3),
                          "figures_s": round(time.time() - computed_at, 3)}
    fs, root = fsspec.core.url_to_fs(folder)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    for name, png in images.items():
        with fs.open(f"{root}/{name}.png", "wb") as f:
            f.write(png)
    with fs.open(f"{root}/report.json", "w") as f:
        json.dump(plain(numbers), f, indent=1)
    with fs.open(f"{root}/index.html", "w") as f:
        f.write(page.render(plain(numbers), images))


def summary(uri: str, settings: ReportSettings | None = None) -> dict:
    """The report's numbers: from OUT/report/report.json when it is of the published run (and of these settings,
    when given), else computed afresh with them (nothing written)."""
    from mapray.outputs import read_manifest

    uri = absolute(uri).rstrip("/")
    manifest = read_manifest(uri)
    try:
        with fsspec.open(f"{uri}/report/report.json") as f:
            saved = json.load(f)
        if saved["run"]["run_id"] == manifest["run_id"] and (settings is None or
                                                              saved["settings"] == plain(vars(settings))):
            return saved
    except (FileNotFoundError, KeyError, ValueError):
        pass
    return plain(_compute(uri, settings or ReportSettings())[0])


def by_group_of_run(settings: ReportSettings, by: str | None) -> ReportSettings:
    """A run that selected per group is broken down by its groups unless `--by` names another column."""
    return settings if settings.by is not None or by is None else dataclasses.replace(settings, by=by)


def _compute(uri: str, settings: ReportSettings):
    from mapray.outputs import read_manifest
    from mapray.report.compute import check, compute
    from mapray.runtime import init_ray

    manifest = read_manifest(uri)  # first: no manifest, no report
    settings = by_group_of_run(settings, manifest["config"]["selection"].get("by"))
    check(uri, settings)  # a bad flag or output stops here, before Ray starts
    init_ray(RayConfig(), [])
    numbers, sample = compute(uri, manifest, settings)
    numbers["run"] = {key: manifest[key] for key in RUN_KEYS if key in manifest}
    numbers["output"] = uri
    return numbers, sample


def plain(value):
    """JSON-ready: numpy scalars and arrays as Python numbers and lists, tuples as lists, NaN and inf as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
