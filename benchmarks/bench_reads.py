"""What one Ray Data Parquet read costs on this machine, with each of Ray Data's Parquet datasources: the fixed
cost mapray's runs pay per read (`mapray.runtime.tune_ray_data` picks the first datasource on one machine).

    .venv/bin/python benchmarks/bench_reads.py [--rows 30] [--repeat 3]    # one JSON line per read
"""

import argparse
import json
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray
    import ray.data

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    with tempfile.TemporaryDirectory() as folder:
        for i in range(4):  # a staged folder as a run writes it: a few files
            pq.write_table(pa.table({"pair_id": [f"p{i}-{j}" for j in range(args.rows // 4)],
                                     "explicit_margin": [float(j) for j in range(args.rows // 4)]}),
                           f"{folder}/part-{i}.parquet")
        for attempt in range(args.repeat):
            for v2 in (True, False):
                ctx.use_datasource_v2 = v2
                started = time.perf_counter()
                rows = ray.data.read_parquet(folder).materialize().count()
                print(json.dumps({"datasource": "v2 (Ray Data's default)" if v2 else "v1", "attempt": attempt,
                                  "rows": rows, "read_s": round(time.perf_counter() - started, 3),
                                  "cpus": os.cpu_count()}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
