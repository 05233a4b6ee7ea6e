#!/usr/bin/env bash
# One pass on an H100/H200 machine (torch 2.11, no network): matmul peak, scoring throughput on 1B and 8B
# random-init shapes (naive trainer recipe vs mapray's torch engine with and without prefix sharing), the 8B
# shape on 16k-token responses (peak memory), then the pipeline on a local Ray with GPU actors and one actor
# SIGKILLed. Results go to $OUT (or ./gpu-results). Needs .gpu-bundle/ for the Ray part
# (../shared/tools/gpu-ray-bundle.sh).
set -u
out=${OUT:-gpu-results}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/matmul_peak.py | tee "$out/peak.json"
peak=$(python3 -c "import json; print(json.load(open('$out/peak.json'))['bf16_matmul_tflops'])")
for spec in "1b 256" "8b 96"; do
  set -- $spec
  timeout 240 python3 benchmarks/bench_scoring.py --shape "$1" --pairs "$2" --dtype bfloat16 \
    --methods naive,torch,torch-separate --token-budget 32768 --check-pairs 2 --peak-tflops "$peak" 2>>"$out/bench.err" \
    | tee -a "$out/bench.jsonl"
done
# memory: two pairs with 16,384-token responses; the trainer recipe gets one pair per batch
timeout 180 python3 benchmarks/bench_scoring.py --shape 8b --pairs 2 --prompt-len 512 --response-len 16384 \
  --exact-lengths --dtype bfloat16 --methods torch,naive --naive-batch 2 --token-budget 32768 --max-length 32768 \
  --check-pairs 1 --peak-tflops "$peak" 2>>"$out/bench.err" | tee -a "$out/bench.jsonl"
if [ -d .gpu-bundle ]; then
  bash .gpu-bundle/install.sh && PYTHONPATH=/tmp/site:$PWD timeout 240 python3 benchmarks/gpu_pipeline_check.py \
    --pairs 400 --out /tmp/mapray-gpu-check 2>"$out/pipeline.err" | tee "$out/pipeline.jsonl"
  tail -c 6000 "$out/pipeline.err" > "$out/pipeline.err.tail"; rm -f "$out/pipeline.err"
fi
