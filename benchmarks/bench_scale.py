"""Scale: a synthetic pool of N pairs through the real CLI, `mapray score`, `mapray rescore` with only the policy
changed, then `mapray select`, each phase measured from outside the process as a user would run it.

The pool has the real (prompt, chosen, rejected) token-length spreads of `lengths/*.jsonl`, each length capped
at half of `--max-length`, and its texts are words that the tiny test tokenizer keeps as one token each, so a
row's token counts follow the drawn lengths. The models are mapray's tiny random ones (policy, reference,
reward, and a second policy with perturbed weights for the rescore): the model's work stays small, so what
grows with N is mapray's own cost (reads, caches, the global pass, the writes).

    python benchmarks/bench_scale.py --pairs 10000,100000,1000000 --workdir /tmp/mapray-scale --out results.jsonl

One JSON line per (N, phase): wall seconds and pairs/s, the manifest's own `timings`, peak RSS of the driver
(the CLI process) and of every other process under it by kind (`ray::MapWorker(MapBatches(LogprobStage))`,
raylet, ...), sampled every `--sample-s`; RSS counts the object-store pages a worker maps, so `private` (RSS
less shared pages) is given beside it. Files under the output and the cache after the phase, the object-store
spill (the peak size of the spill folder, which Ray empties at exit, and the largest "Spilled N MiB" Ray
logged), and the `_loads/` markers the cache writes when a model is actually loaded, by model. A Markdown table
of all phases follows at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = sorted((ROOT / "benchmarks" / "lengths").glob("*.jsonl"))
WRITE_ROWS = 10_000  # rows per Parquet write: the generator holds one such slice of text at a time
STREAM_WORDS = 1 << 20  # texts are slices of one random word stream: fast, and collisions are negligible
SPILLED = re.compile(r"Spilled (\d+) MiB")
METHOD = re.compile(r"\.\w+$")  # an actor's title names the method it runs: `ray::_StatsActor.register_dataset`
STAGE = "ray::MapWorker(MapBatches("  # Ray Data's title of a map_batches actor: the model stages
POOL_SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "prompt", "chosen", "rejected")])


# --- the pool and the models, built once under the workdir ---

def one_token_words() -> list[str]:
    """Words the tiny tokenizer encodes as one token each when preceded by a space."""
    from mapray.testing.tiny_models import build_tokenizer

    vocab = build_tokenizer().get_vocab()
    return sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)


def real_lengths() -> np.ndarray:
    """(pairs, 3) prompt/chosen/rejected token counts of the real samples, all files together."""
    return np.array([json.loads(line) for f in LENGTHS for line in f.read_text().splitlines()])


def write_pool(folder: Path, n: int, seed: int, max_length: int, rows_per_file: int, reuse: bool) -> None:
    marker = folder.with_suffix(".json")  # beside the folder: mapray reads every file inside it as Parquet
    want = {"pairs": n, "seed": seed, "max_length": max_length, "rows_per_file": rows_per_file}
    if reuse and marker.exists() and json.loads(marker.read_text()) == want:
        return
    shutil.rmtree(folder, ignore_errors=True)
    marker.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    words = np.array(one_token_words())
    stream = " " + " ".join(words[rng.integers(0, len(words), STREAM_WORDS)]) + " "
    starts = np.flatnonzero(np.frombuffer(stream.encode(), np.uint8) == ord(" "))  # ASCII: bytes are chars
    real, cap = real_lengths(), max_length // 2 - 2  # BOS and EOS: prompt + response stays within max_length

    def texts(lengths: np.ndarray, lead: str) -> list[str]:
        first = rng.integers(0, STREAM_WORDS - lengths.max() - 1, len(lengths))
        return [lead + stream[starts[a] + 1:starts[a + k]] for a, k in zip(first, lengths)]

    for file_start in range(0, n, rows_per_file):
        with pq.ParquetWriter(folder / f"part-{file_start // rows_per_file:05d}.parquet", POOL_SCHEMA) as w:
            for start in range(file_start, min(n, file_start + rows_per_file), WRITE_ROWS):
                size = min(WRITE_ROWS, n - start, file_start + rows_per_file - start)
                lengths = np.clip(real[rng.integers(0, len(real), size)], 1, cap)
                w.write_table(pa.table({"id": [f"pair-{i:08d}" for i in range(start, start + size)],
                                        "prompt": texts(lengths[:, 0], ""), "chosen": texts(lengths[:, 1], " "),
                                        "rejected": texts(lengths[:, 2], " ")}, schema=POOL_SCHEMA))
    marker.write_text(json.dumps(want))


def build_models(folder: Path) -> dict[str, str]:
    """Tiny policy, reference and reward (mapray.testing), plus `policy2`: the policy's weights scaled by 0.9,
    a new checkpoint as a nightly training step would leave."""
    names = ("policy", "reference", "reward", "policy2")
    paths = {name: str(folder / name) for name in names}
    if all((folder / name / "config.json").exists() for name in names):
        return paths
    from mapray.testing.tiny_models import build_tiny_models, perturbed_copy

    build_tiny_models(folder)
    perturbed_copy(paths["policy"], paths["policy2"])
    return paths


def run_config(pool: Path, models: dict, out: Path, cache: Path, args) -> dict:
    model = {"max_length": args.max_length, "truncation_mode": "keep_end", "batch_size": args.batch_size,
             "cpus_per_actor": 0.5}  # three 0.5-CPU actors and the light tasks fit 2 CPUs (ENVIRONMENT.md)
    return {"input": {"uri": str(pool), "format": "standard", "file_format": "parquet", "columns": {"id": "id"}},
            "output": str(out), "cache": str(cache),
            "policy": {"path": models["policy"], **model}, "reference": {"path": models["reference"], **model},
            "reward": {"source": "model", "model": {"path": models["reward"], **model}},
            "metric": {"implicit": "dpo"}}


# --- measuring a phase from outside: the process tree, the spill folder, the files ---

def process_kind(cmdline: list[str]) -> str:
    """A stable name for a process of the tree: Ray's title for workers and actors (without the method an
    actor is running), else the program or Python script."""
    if cmdline[0].startswith("ray::"):
        return METHOD.sub("", cmdline[0].split()[0])
    scripts = [Path(a).name for a in cmdline[1:] if a.endswith(".py")]
    return scripts[0] if scripts and Path(cmdline[0]).name.startswith("python") else Path(cmdline[0]).name


class TreeSampler(threading.Thread):
    """Samples the RSS of a process and all its descendants, and the size of a folder, until stopped."""

    def __init__(self, pid: int, spill: Path, every_s: float):
        super().__init__(daemon=True)
        self.pid, self.spill, self.every_s = pid, spill, every_s
        self.peak: dict[tuple[int, str], tuple[int, int]] = {}  # (pid, kind) -> (rss, rss - shared)
        self.tree_peak = self.spill_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = sum(self._sample(p, p.pid == self.pid) for p in procs)
            self.tree_peak = max(self.tree_peak, total)
            self.spill_peak = max(self.spill_peak, folder_bytes(self.spill))
            self.done.wait(self.every_s)

    def _sample(self, proc, is_driver: bool) -> int:
        import psutil

        try:
            mem, cmdline = proc.memory_info(), proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return 0
        if not cmdline:  # exiting
            return mem.rss
        kind = "driver" if is_driver else process_kind(cmdline)
        rss, private = self.peak.get((proc.pid, kind), (0, 0))
        self.peak[proc.pid, kind] = max(rss, mem.rss), max(private, mem.rss - mem.shared)
        return mem.rss

    def by_kind(self) -> dict[str, dict]:
        """Per kind: how many processes, the largest peak RSS and private memory of any one of them (MiB)."""
        out: dict[str, dict] = {}
        for (_, kind), (rss, private) in self.peak.items():
            row = out.setdefault(kind, {"processes": 0, "rss_mib": 0.0, "private_mib": 0.0})
            row["processes"] += 1
            row["rss_mib"] = max(row["rss_mib"], round(rss / 2**20, 1))
            row["private_mib"] = max(row["private_mib"], round(private / 2**20, 1))
        return dict(sorted(out.items()))


def folder_bytes(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    except OSError:  # a file deleted while walking
        return 0


def count_files(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def model_loads(cache: Path, shas: dict[str, str]) -> Counter:
    """`_loads/` markers under the cache by model role, told apart by the model hash in the marker's path."""
    loads: Counter = Counter()
    for marker in cache.glob("**/_loads/*"):
        roles = [role for sha, role in shas.items() if sha in str(marker.relative_to(cache))]
        loads[roles[0] if roles else "unknown"] += 1
    return loads


def run_phase(command: list[str], log: Path, spill: Path, every_s: float) -> tuple[int, float, TreeSampler]:
    env = dict(os.environ, RAY_object_spilling_directory=str(spill))
    env.pop("RAY_ADDRESS", None)  # an embedded local Ray: its workers are the CLI's descendants, sampled here
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    spill.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = TreeSampler(proc.pid, spill, every_s)
        sampler.start()
        rc = proc.wait()
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    return rc, seconds, sampler


# --- one N: the three phases ---

def phases(folder: Path, config: Path, models: dict, ratio: float) -> list[tuple[str, list[str], Path]]:
    cli = [sys.executable, "-m", "mapray"]
    rescored = folder / "rescore"
    return [("score", [*cli, "score", "--config", str(config)], folder / "score"),
            ("rescore", [*cli, "rescore", "--config", str(config), "--set", f"policy.path={models['policy2']}",
                         "--set", f"output={rescored}"], rescored),
            ("select", [*cli, "select", "--output", str(rescored), "--ratio", str(ratio)], rescored)]


def bench_n(n: int, models: dict, args) -> Iterator[dict]:
    """The three phases on a pool of n pairs, one row each as it finishes; a failed phase ends this n."""
    pool = args.workdir / "pools" / f"n{n}"
    started = time.perf_counter()
    write_pool(pool, n, args.seed, args.max_length, args.rows_per_file, reuse=args.reuse_pools)
    print(f"pool of {n} pairs ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    folder = args.workdir / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)  # a cold cache and fresh outputs: the score phase starts empty
    folder.mkdir(parents=True)
    cache = folder / "cache"
    config = folder / "run.yaml"
    config.write_text(json.dumps(run_config(pool, models, folder / "score", cache, args), indent=1))
    shas: dict[str, str] = {}  # model hash -> role, from the manifests: the cache's folders are named by it
    for phase, command, output in phases(folder, config, models, args.ratio):
        before, earlier = model_loads(cache, shas), read_manifest(output).get("timings", {})
        rc, seconds, sampler = run_phase(command, folder / f"{phase}.log", folder / f"spill-{phase}", args.sample_s)
        manifest = read_manifest(output) if rc == 0 else {}
        shas |= {m["sha256"]: role.split(".")[0] for role, m in manifest.get("models", {}).items()}
        row = phase_row(n, phase, rc, seconds, sampler, manifest, folder / f"{phase}.log")
        after = model_loads(cache, shas)
        # a reselect keeps the scoring run's timings beside its own: only what this phase measured
        row["timings"] = {k: round(v, 3) for k, v in row["timings"].items() if earlier.get(k) != v}
        row |= {"files": {"output": count_files(output), "cache": count_files(cache)},
                "model_loads": dict(after), "model_loads_added": dict(after - before)}
        yield row
        if rc != 0:
            print(f"{phase} failed (exit {rc}); see {folder / f'{phase}.log'}", file=sys.stderr)
            return


def bench_select_at(n: int, source: Path, args) -> dict:
    """`mapray select` over an output of n scored pairs, made by copying the rows of a smaller finished run with new
    pair ids (each copy's scores as they were): the global pass at a size whose model pass would not fit here."""
    folder = args.workdir / f"select-n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "scored").mkdir(parents=True)
    rows = pq.read_table(source / "scored")
    written = 0
    for copy in range(-(-n // rows.num_rows)):
        part = rows.slice(0, min(rows.num_rows, n - written))
        ids = pa.array([f"{pid}#{copy}" for pid in part["pair_id"].to_pylist()])
        pq.write_table(part.set_column(part.schema.get_field_index("pair_id"), "pair_id", ids),
                       folder / "scored" / f"part-{copy:05d}.parquet")
        written += part.num_rows
    shutil.copytree(source / "rejects", folder / "rejects")
    manifest = read_manifest(source)
    manifest["counts"] = dict(manifest["counts"], input=n + manifest["counts"]["rejected"], scored=n)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    command = [sys.executable, "-m", "mapray", "select", "--output", str(folder), "--ratio", str(args.ratio)]
    rc, seconds, sampler = run_phase(command, folder / "select.log", folder / "spill", args.sample_s)
    row = phase_row(n, "select (copied rows)", rc, seconds, sampler, read_manifest(folder), folder / "select.log")
    row["timings"] = {k: v for k, v in row["timings"].items() if k == "reselect_s"}
    return row | {"files": {"output": count_files(folder), "cache": 0}, "model_loads": {}, "model_loads_added": {}}


def read_manifest(output: Path) -> dict:
    path = output / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def phase_row(n: int, phase: str, rc: int, seconds: float, sampler: TreeSampler, manifest: dict,
              log: Path) -> dict:
    kinds = sampler.by_kind()
    driver = kinds.pop("driver", {"rss_mib": 0.0, "private_mib": 0.0})
    logged = [int(m) for m in SPILLED.findall(log.read_text(errors="replace"))]
    return {"pairs": n, "phase": phase, "rc": rc, "seconds": round(seconds, 2),
            "pairs_per_s": round(n / seconds, 2), "counts": {k: v for k, v in manifest.get("counts", {}).items()
                                                             if k != "rejected_by_code"},
            "timings": manifest.get("timings", {}), "driver_rss_mib": driver["rss_mib"],
            "driver_private_mib": driver["private_mib"], "tree_rss_peak_mib": round(sampler.tree_peak / 2**20, 1),
            "processes": kinds, "spill_peak_bytes": sampler.spill_peak, "spilled_mib_logged": max(logged, default=0),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def table(rows: list[dict]) -> str:
    lines = ["| pairs | phase | s | pairs/s | driver RSS MiB | model actors' RSS MiB | other Ray workers' RSS MiB "
             "| files out / cache | spill MiB | ref / reward loads added |", "|" + "---|" * 10]
    for r in rows:
        workers = {k: v["rss_mib"] for k, v in r["processes"].items() if k.startswith("ray::")}
        stages = ", ".join(f"{k.removeprefix(STAGE).rstrip(')')} {v:.0f}" for k, v in workers.items()
                           if k.startswith(STAGE)) or "-"
        others = max((v for k, v in workers.items() if not k.startswith(STAGE)), default=0)
        added = r["model_loads_added"]
        lines.append(f"| {r['pairs']:,} | {r['phase']} | {r['seconds']:.1f} | {r['pairs_per_s']:.1f} "
                     f"| {r['driver_rss_mib']:.0f} | {stages} | {others:.0f} "
                     f"| {r['files']['output']} / {r['files']['cache']} "
                     f"| {max(r['spill_peak_bytes'] / 2**20, r['spilled_mib_logged']):.0f} "
                     f"| {added.get('reference', 0)} / {added.get('reward', 0)} |")
    return "\n".join(lines)


def record(row: dict, rows: list[dict], out: Path) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:  # line by line: the large phases take long, a crash keeps what was done
        f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="10000,100000,1000000", help="pool sizes, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mapray-bench-scale"))
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"), help="JSON lines are appended here")
    parser.add_argument("--reuse-pools", action="store_true", help="keep a pool already written with these settings")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence; lengths capped at half")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per Ray batch of each model stage")
    parser.add_argument("--rows-per-file", type=int, default=100_000, help="rows per Parquet file of the pool")
    parser.add_argument("--ratio", type=float, default=0.1, help="`mapray select --ratio`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--select-at", type=int, metavar="N",
                        help="then `mapray select` over N scored pairs copied from the largest run's rescore output")
    parser.add_argument("--select-from", type=int, metavar="M", help="with --pairs '': copy the rescore output "
                        "of an earlier run of M pairs in the same workdir")
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    models = build_models(args.workdir / "models")
    rows = []
    sizes = [int(p) for p in args.pairs.split(",") if p]
    for n in sizes:
        for row in bench_n(n, models, args):
            record(row, rows, args.out)
    if args.select_at:  # from this invocation's largest run, or one an earlier invocation left in the workdir
        source = args.workdir / f"n{max(sizes) if sizes else args.select_from}" / "rescore"
        record(bench_select_at(args.select_at, source, args), rows, args.out)
    print(table(rows))
    if any(row["rc"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
