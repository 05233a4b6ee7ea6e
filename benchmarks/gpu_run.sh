#!/usr/bin/env bash
# One pass on an H100/H200 machine (torch 2.11, no network): matmul peak; log-prob scoring throughput on 1B
# and 8B random-init shapes, the trainer recipe against mapray's torch engine with and without prefix sharing
# and packing, on drawn lengths and on the real length spread of the shipped UltraFeedback and HH samples;
# the 8B shape on 16k-token responses (peak memory); then the pipeline on a local Ray with GPU actors and one
# actor SIGKILLed. Results go to $OUT (or ./gpu-results). The Ray part needs .gpu-bundle/
# (../shared/tools/gpu-ray-bundle.sh).
set -u
out=${OUT:-gpu-results}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/matmul_peak.py | tee "$out/peak.json"
peak=$(python3 -c "import json; print(json.load(open('$out/peak.json'))['bf16_matmul_tflops'])")
bench() {  # shape, pairs, seconds allowed, then bench_scoring.py arguments
  local shape=$1 pairs=$2 limit=$3; shift 3
  timeout "$limit" python3 benchmarks/bench_scoring.py --shape "$shape" --pairs "$pairs" --dtype bfloat16 \
    --token-budget 32768 --check-pairs 2 --peak-tflops "$peak" "$@" 2>>"$out/bench.err" | tee -a "$out/bench.jsonl"
}
all=naive,torch,torch-nosharing,torch-padded
bench 1b 256 60 --methods "$all"
bench 8b 96 90 --methods "$all"
for data in ultrafeedback hh-rlhf-harmless; do
  bench 1b 256 60 --methods "$all" --lengths "benchmarks/lengths/$data-smollm2.jsonl" --max-length 2048
  bench 8b 96 90 --methods "$all" --lengths "benchmarks/lengths/$data-smollm2.jsonl" --max-length 2048
done
# memory: two pairs with 16,384-token responses; the trainer recipe gets one pair per batch
bench 8b 2 120 --prompt-len 512 --response-len 16384 --exact-lengths --methods torch,naive --naive-batch 2 \
  --max-length 32768 --check-pairs 1
if [ -d .gpu-bundle ]; then
  bash .gpu-bundle/install.sh && PYTHONPATH=/tmp/site:$PWD timeout 240 python3 benchmarks/gpu_pipeline_check.py \
    --pairs 400 --out /tmp/mapray-gpu-check 2>"$out/pipeline.err" | tee "$out/pipeline.jsonl"
  tail -c 6000 "$out/pipeline.err" > "$out/pipeline.err.tail"; rm -f "$out/pipeline.err"
fi
