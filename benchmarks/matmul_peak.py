"""Measured bf16 matmul peak of this GPU (8192^3, mean of 10 after 3 warm-ups): the denominator of the
fraction-of-peak column in bench_scoring.py. Prints one JSON line."""

import json
import time

import torch

n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / 10
print(json.dumps({"device": torch.cuda.get_device_name(), "bf16_matmul_tflops": round(2 * n**3 / seconds / 1e12, 1)}))
