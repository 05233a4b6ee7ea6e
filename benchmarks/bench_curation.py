"""Curation at scale: per-group selection (`mapray select --by`) and `mapray diff` over pools of N scored pairs,
through the real CLI, each phase measured from outside the process as bench_scale.py measures it (wall time,
peak RSS of the driver and of every Ray worker).

Two outputs of N rows are made from a finished rescore output of bench_scale.py (its scored/ rows copied with new
pair ids, each copy's scores as they were) with a `source` column of 8 groups of unequal shares (40% down to 1%):
"night 1", and "night 2", where a tenth of night 1's pairs are gone and as many new ones came (renamed), and every
implicit margin moved (the policy changed: N(0, 0.5) added). Then, each in its own process:

1. `mapray select --output NIGHT1 --by source --ratio 0.1 --quota s0=1000 --quota s7=0.5`;
2. the same on NIGHT2;
3. `mapray diff NIGHT1 NIGHT2`.

    python benchmarks/bench_scale.py --pairs 10000 --max-length 128 --workdir /tmp/mapray-scale   # the source
    python benchmarks/bench_curation.py --pairs 10000,1000000 --workdir /tmp/mapray-scale --out results.jsonl

One JSON line per (N, phase), bench_scale.py's fields; a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import count_files, phase_row, read_manifest, record, run_phase, table  # noqa: E402

SHARES = np.array([0.40, 0.20, 0.15, 0.10, 0.07, 0.04, 0.03, 0.01])  # of groups s0 .. s7
SELECT = ["--by", "source", "--ratio", "0.1", "--quota", "s0=1000", "--quota", "s7=0.5"]


def night(folder: Path, source: Path, n: int, second: bool, seed: int) -> None:
    """An output of n rows copied from `source`'s scored/; `second`: night 2's changes (module docstring)."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "scored").mkdir(parents=True)
    rows = pq.read_table(source / "scored")
    rng = np.random.default_rng(seed)
    written = 0
    for copy in range(-(-n // rows.num_rows)):
        part = rows.slice(0, min(rows.num_rows, n - written))
        ids = np.array([f"{pid}#{copy}" for pid in part["pair_id"].to_pylist()], dtype=object)
        bucket = np.array([int(hashlib.blake2b(i.encode(), digest_size=4).hexdigest(), 16) % 10 for i in ids])
        if second:  # a tenth gone and as many new (renamed), every implicit margin moved
            ids = np.where(bucket == 1, ids + "#new", ids)
            part = part.set_column(part.schema.get_field_index("implicit_margin"), "implicit_margin", pa.array(
                part["implicit_margin"].to_numpy() + rng.normal(0, 0.5, part.num_rows)))
        groups = np.searchsorted(np.cumsum(SHARES), (bucket * 7919 + np.arange(part.num_rows)) % 1000 / 1000,
                                 side="right").clip(0, len(SHARES) - 1)
        part = part.set_column(part.schema.get_field_index("pair_id"), "pair_id", pa.array(ids.tolist()))
        part = part.append_column("source", pa.array([f"s{g}" for g in groups]))
        pq.write_table(part, folder / "scored" / f"part-{copy:05d}.parquet")
        written += part.num_rows
    shutil.copytree(source / "rejects", folder / "rejects")
    manifest = read_manifest(source)
    manifest["counts"] = dict(manifest["counts"], input=n + manifest["counts"]["rejected"], scored=n)
    manifest["run_id"] = f"night-{2 if second else 1}"
    if second:
        manifest["models"] = dict(manifest["models"], policy=dict(manifest["models"]["policy"], sha256="f" * 64))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def bench(n: int, source: Path, args) -> list[dict]:
    folder = args.workdir / f"curation-n{n}"
    one, two = folder / "night1", folder / "night2"
    night(one, source, n, second=False, seed=args.seed)
    night(two, source, n, second=True, seed=args.seed + 1)
    cli = [sys.executable, "-m", "mapray"]
    rows = []
    for phase, command, output in (
            ("select --by source (night 1)", [*cli, "select", "--output", str(one), *SELECT], one),
            ("select --by source (night 2)", [*cli, "select", "--output", str(two), *SELECT], two),
            ("diff night 1 -> night 2", [*cli, "diff", str(one), str(two)], two)):
        slug = phase.split()[0]
        rc, seconds, sampler = run_phase(command, folder / f"{slug}-{len(rows)}.log", folder / "spill",
                                         args.sample_s)
        row = phase_row(n, phase, rc, seconds, sampler, read_manifest(output), folder / f"{slug}-{len(rows)}.log")
        row["timings"] = {k: v for k, v in row["timings"].items() if k == "reselect_s"} if slug == "select" else {}
        if slug == "diff" and rc == 0:
            numbers = json.loads((two / "diff.json").read_text())
            row["diff"] = {k: numbers[k] for k in ("pairs", "selected", "churn")}
        elif rc == 0:
            row["groups"] = [{k: g[k] for k in ("value", "pool", "selected")}
                             for g in read_manifest(output)["selection"]["groups"]]
        rows.append(row | {"files": {"output": count_files(output), "cache": 0}, "model_loads": {},
                           "model_loads_added": {}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="10000,1000000", help="pool sizes, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mapray-scale"))
    parser.add_argument("--source", type=Path, help="a finished output to copy rows from (default: WORKDIR/n10000/"
                        "rescore, bench_scale.py's)")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"), help="JSON lines are appended here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between memory samples")
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    source = args.source or args.workdir / "n10000" / "rescore"
    rows: list[dict] = []
    for n in (int(p) for p in args.pairs.split(",") if p):
        for row in bench(n, source, args):
            record(row, [], args.out)
            rows.append(row)
    print(table(rows))
    if any(row["rc"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
