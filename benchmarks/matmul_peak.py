"""Measured matmul peak of this machine's accelerator, or of its CPU (`--device cpu`): n x n x n products (8192 on
a GPU, 2048 on a CPU), mean of 10 after 3 warm-ups. The denominator of the fraction-of-peak columns
(bench_scoring.py) and of `mapray estimate`'s figures. Prints one JSON line."""

import argparse
import json
import platform
import time

import torch

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
args = parser.parse_args()
n = 8192 if args.device == "cuda" else 2048
dtype = getattr(torch, args.dtype)
a = torch.randn(n, n, device=args.device, dtype=dtype)
b = torch.randn(n, n, device=args.device, dtype=dtype)


def sync() -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


for _ in range(3):
    a @ b
sync()
start = time.perf_counter()
for _ in range(10):
    a @ b
sync()
seconds = (time.perf_counter() - start) / 10
name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
    f"{torch.get_num_threads()} threads"
key = "bf16_matmul_tflops" if args.dtype == "bfloat16" else "fp32_matmul_tflops"
print(json.dumps({"device": name, key: round(2 * n**3 / seconds / 1e12, 4)}))
