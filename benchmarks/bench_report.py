"""`mapray report` on a synthetic scored/ pool: time and peak memory, no models.

Writes an output folder shaped like a finished run's (scored/ with every public column and short text columns,
rejects/, manifest.json; the run's selection: map_z, alpha 1, ratio 0.4), then runs `mapray.report.report` on an
embedded local Ray in a fresh process and prints one JSON line: rows, seconds to generate, seconds to report (Ray
start included, and separately the report's own compute and figure times), the driver's peak RSS and the peak
RSS of the driver plus its Ray processes (sampled every 0.5 s).

    python benchmarks/bench_report.py --rows 1000000 --out /tmp/bench-report
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
SOURCES = ("ultrafeedback", "hh-rlhf", "helpsteer", "shp")


def scored_part(rng: np.random.Generator, start: int, n: int) -> pa.Table:
    """n scored rows: margins drawn like a real pool (the reward model mostly agrees with the labels, the policy
    weakly), response lengths from a log-normal spread, text columns short."""
    # distinct, unordered ids: row numbers times an odd constant, mod 2^64 (a bijection)
    ids = [f"{v:016x}" for v in (np.arange(start, start + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))]
    r_w, r_l = rng.normal(1.0, 1.5, n), rng.normal(-0.5, 1.5, n)
    chosen_tokens = np.clip(rng.lognormal(5.3, 0.7, n), 1, 4096).astype(np.int64)
    rejected_tokens = np.clip(rng.lognormal(5.1, 0.7, n), 1, 4096).astype(np.int64)
    logp_w, logp_l = -chosen_tokens * rng.uniform(0.6, 1.4, n), -rejected_tokens * rng.uniform(0.7, 1.5, n)
    ir_w, ir_l = 2.0 * logp_w / chosen_tokens, 2.0 * logp_l / rejected_tokens
    text = np.char.mod("synthetic text %d", np.arange(start, start + n))
    return pa.table({
        "prompt": text, "chosen": text, "rejected": text,
        "source": np.array(SOURCES)[rng.integers(0, len(SOURCES), n)],
        "pair_id": ids, "reward_chosen": r_w, "reward_rejected": r_l, "explicit_margin": r_w - r_l,
        "chosen_logps": logp_w, "rejected_logps": logp_l,
        "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens,
        "chosen_truncated": chosen_tokens >= 4096, "rejected_truncated": rejected_tokens >= 4096,
        "ref_chosen_logps": pa.nulls(n, pa.float64()), "ref_rejected_logps": pa.nulls(n, pa.float64()),
        "implicit_reward_chosen": ir_w, "implicit_reward_rejected": ir_l, "implicit_margin": ir_w - ir_l,
    })


def with_selection(parts: list[pa.Table], alpha: float, ratio: float) -> list[pa.Table]:
    """The MAP forms and `selected` as the global pass writes them (map_z over the whole pool)."""
    m_ex = np.concatenate([p.column("explicit_margin").to_numpy() for p in parts])
    a_im = np.abs(np.concatenate([p.column("implicit_margin").to_numpy() for p in parts]))
    (ex_mean, ex_std), (im_mean, im_std) = (m_ex.mean(), m_ex.std()), (a_im.mean(), a_im.std())
    map_z = (m_ex - ex_mean) / ex_std - alpha * (a_im - im_mean) / im_std
    k = int(len(m_ex) * ratio)
    selected = np.zeros(len(m_ex), dtype=bool)
    selected[np.argsort(-map_z, kind="stable")[:k]] = True  # continuous scores: no ties to break
    out, at = [], 0
    for p in parts:
        n, m_im = p.num_rows, p.column("implicit_margin").to_numpy()
        m = p.column("explicit_margin").to_numpy()
        out.append(p.append_column("map", pa.array(np.abs(m) - alpha * np.abs(m_im)))
                   .append_column("map_unreg", pa.array(m - alpha * m_im))
                   .append_column("map_z", pa.array(map_z[at:at + n]))
                   .append_column("selected", pa.array(selected[at:at + n])))
        at += n
    return out


def generate(out: Path, rows: int, files: int, seed: int = 0) -> None:
    from mapray import columns as C
    from mapray.config import InputConfig, ModelConfig, RunConfig, to_dict

    rng = np.random.default_rng(seed)
    per = -(-rows // files)
    parts = with_selection([scored_part(rng, i, min(per, rows - i)) for i in range(0, rows, per)], 1.0, 0.4)
    (out / "scored").mkdir(parents=True)
    for i, part in enumerate(parts):
        pq.write_table(part, out / "scored" / f"part-{i:03d}.parquet")
    n_rej = max(1, rows // 200)
    reasons = np.array(["empty chosen response", "prompt alone fills max_length", "no score for the chosen response"])
    (out / "rejects").mkdir()
    pq.write_table(pa.table({
        "pair_id": np.char.mod("r%d", np.arange(n_rej)), "reason": reasons[rng.integers(0, 3, n_rej)],
        "stage": np.array(["normalize", "policy", "normalize"])[rng.integers(0, 3, n_rej)],
        "source": [f"in-{f}.jsonl:{line}" for f, line in zip(rng.integers(0, 4, n_rej), range(1, n_rej + 1))],
        "raw": np.full(n_rej, "{}")}, schema=C.REJECTS_SCHEMA), out / "rejects" / "part-000.parquet")
    cfg = RunConfig(input=InputConfig(uri=[f"in-{i}.jsonl" for i in range(4)]), output=str(out),
                    policy=ModelConfig(path="synthetic"))
    manifest = {"run_id": "run-synthetic", "config": to_dict(cfg), "models": {}, "finished_at": "synthetic",
                "counts": {"input": rows + n_rej, "scored": rows, "rejected": n_rej, "selected": int(rows * 0.4)}}
    (out / "manifest.json").write_text(json.dumps(manifest))


def peak_rss_sampler(stop: threading.Event, peak: list[int]) -> None:
    """Every 0.5 s: RSS of this process plus its descendants (the embedded Ray: GCS, raylet, workers), so other
    Ray sessions on a shared machine do not count."""
    import psutil

    me = psutil.Process()
    while not stop.wait(0.5):
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker that just exited
                total += proc.memory_info().rss
        peak[0] = max(peak[0], total)


def run_report(out: Path) -> dict:
    """The report in this process (a fresh one: its peak RSS is the report's alone)."""
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.time()
    from mapray.report import ReportSettings, report

    numbers = report(str(out), ReportSettings(by="source"))
    stop.set()
    sampler.join()
    return {"report_s": round(time.time() - started, 1), **numbers["timings"],
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_driver_and_ray_mb": round(peak[0] / 2**20), "selected": numbers["selected"],
            "html_bytes": (out / "report" / "index.html").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--out", default="/tmp/mapray-bench-report")
    parser.add_argument("--report-only", action="store_true", help="report on an existing --out (used internally)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        print(json.dumps(run_report(out)))
        return
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    generate(out, args.rows, args.files)
    generate_s = round(time.time() - started, 1)
    child = subprocess.run([sys.executable, __file__, "--report-only", "--out", str(out)], check=True,
                           capture_output=True, text=True)
    print(json.dumps({"rows": args.rows, "generate_s": generate_s, **json.loads(child.stdout.splitlines()[-1]),
                      "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
