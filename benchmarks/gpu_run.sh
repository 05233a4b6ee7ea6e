#!/usr/bin/env bash
# Every GPU measurement in one call, for a lent H100/H200 (torch 2.11, no network): the matmul peak; log-prob
# scoring on 1B and 8B random-init shapes, the trainer recipe against every variant of mapray's torch engine
# (padded, packing, sharing, both; the dense tree mask through SDPA and the block mask through FlexAttention),
# on the real length spread of the shipped UltraFeedback sample, at token budgets 16k/32k/64k; the 8B shape on
# pairs with 16,384-token responses (peak memory; the recipe's out-of-memory is a result); the pipeline on a
# local Ray with GPU actors and one actor SIGKILLed; TRL's own reference precompute beside the torch engine at
# 8B (the peers' GPU variant); then drawn lengths and the HH spread, if time is left.
#
#   bash benchmarks/gpu_run.sh          on the GPU machine; results in $OUT (default ./gpu-results)
#   bash benchmarks/gpu_run.sh --tiny   the same steps on a CPU with the tiny shape: checks the script
#
# The whole run keeps within GPU_RUN_SECONDS (default 420: one 8-minute call with room to spare); each step
# gets the smaller of its own limit and what is left, most important first, so a cut loses the least. Every
# result line is appended to $OUT as its method finishes: a timeout keeps what finished. steps.jsonl says how
# each step ended. The pipeline step needs Ray: .gpu-bundle/ (../shared/tools/gpu-ray-bundle.sh) on the GPU
# machine, the Python in use elsewhere; the peers step needs TRL: .gpu-bundle/peers/ (gpu_peers_bundle.sh). GPU_RUN_SKIP
# leaves out steps, by name ("core-1b") or kind ("extra").
set -u
tiny=0; [ "${1:-}" = --tiny ] && tiny=1
export out=${OUT:-gpu-results} py=${PYTHON:-python3} tiny
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$((SECONDS + ${GPU_RUN_SECONDS:-420}))

step() {  # name, seconds it may take, then a command (a function below or a program) and its arguments
  local name=$1 want=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
  shift 2
  if [[ " ${GPU_RUN_SKIP:-} " == *" $name "* || " ${GPU_RUN_SKIP:-} " == *" ${name%%-*} "* ]]; then
    rc='"skipped"'
  elif [ "$left" -lt 15 ]; then
    rc='"no time left"'
  else  # timeout signals the step's whole process group
    timeout "$(( want < left ? want : left ))" bash -c '"$@"' step "$@"; rc=$?
  fi
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" | tee -a "$out/steps.jsonl"
}

if [ "$tiny" = 1 ]; then
  # the pipeline's ~60M-parameter models are the same in both modes: on 2 CPU cores 12 pairs take ~2 minutes
  big=tiny small= pairs_big=6 long_prompt=64 long_response=600 pipeline_pairs=12 pipeline_s=300  # one small shape
  export bench_args="--dtype float32"
else
  big=8b small=1b pairs_big=96 pairs_small=256 long_prompt=512 long_response=16384 pipeline_pairs=400 pipeline_s=130
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  timeout 60 "$py" benchmarks/matmul_peak.py | tee "$out/peak.json"
  # without a measured peak the rows still come, without their fraction-of-peak columns
  peak=$("$py" -c "import json; print(json.load(open('$out/peak.json'))['bf16_matmul_tflops'])" 2>/dev/null)
  export bench_args="${peak:+--peak-tflops $peak}"
fi

# The cases of each shape, one JSON line each (bench_scoring.py --plan), the targets' first: every variant on
# the real UltraFeedback spread at a 32k budget, then 16k and 64k (and 64k with a wider LM-head chunk)
uf=benchmarks/lengths/ultrafeedback-smollm2.jsonl hh=benchmarks/lengths/hh-rlhf-harmless-smollm2.jsonl
every=naive,torch,torch-nosharing,torch-nopacking,torch-padded,torch-flex,torch-flex-nosharing
cat > "$out/plan-core.jsonl" <<PLAN
{"lengths": "$uf", "token_budget": 32768, "methods": "$every"}
{"lengths": "$uf", "token_budget": 16384, "methods": "torch,torch-flex"}
{"lengths": "$uf", "token_budget": 65536, "methods": "torch,torch-flex"}
{"lengths": "$uf", "token_budget": 65536, "lm_head_chunk": 16384, "methods": "torch,torch-flex"}
PLAN
# two pairs with 16,384-token responses (a 33k-token row each); the recipe gets one pair per batch
cat > "$out/plan-long.jsonl" <<PLAN
{"exact_lengths": true, "prompt_len": $long_prompt, "response_len": $long_response, "max_length": 40000, "token_budget": 32768, "check_pairs": 1, "naive_batch": 2, "methods": "torch,torch-flex,naive"}
PLAN
# TRL 1.16's DPOTrainer reference precompute (padded batches of 4 pairs, its fused LM head) against the engine,
# on the same pairs in the same process (bench_scoring.py's trl method)
cat > "$out/plan-peers.jsonl" <<PLAN
{"lengths": "$uf", "token_budget": 32768, "methods": "torch,trl"}
PLAN
cat > "$out/plan-extra.jsonl" <<PLAN
{"lengths": null, "token_budget": 32768, "methods": "naive,torch,torch-padded,torch-flex"}
{"lengths": "$hh", "token_budget": 32768, "methods": "naive,torch,torch-padded,torch-flex"}
PLAN

bench() {  # shape, pairs, plan file: one process, one model, every case of the plan
  # shellcheck disable=SC2086  # bench_args is several words
  "$py" benchmarks/bench_scoring.py --shape "$1" --pairs "$2" --plan "$3" --dtype bfloat16 --max-length 2048 \
    --check-pairs 2 $bench_args 2>>"$out/bench.err" | tee -a "$out/bench.jsonl"
}
pipeline() {  # the pipeline on a local Ray, one policy actor SIGKILLed
  if [ "$tiny" = 0 ]; then
    [ -d .gpu-bundle ] || { echo "no .gpu-bundle/: pipeline step not run" >&2; return 3; }
    bash .gpu-bundle/install.sh && export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  rm -rf /tmp/mapray-gpu-check  # a fresh run, not the resume of an earlier one
  "$py" benchmarks/gpu_pipeline_check.py --pairs "$pipeline_pairs" --out /tmp/mapray-gpu-check \
    2>"$out/pipeline.err" | tee -a "$out/pipeline.jsonl"
  local rc=${PIPESTATUS[0]}
  tail -c 6000 "$out/pipeline.err" > "$out/pipeline.err.tail"; rm -f "$out/pipeline.err"
  return "$rc"
}
peers() {  # shape, pairs: TRL beside the engine; on the GPU machine TRL comes from .gpu-bundle/peers/
  if [ "$tiny" = 0 ]; then
    [ -d .gpu-bundle/peers ] || { echo "no .gpu-bundle/peers/: peers step not run" >&2; return 3; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-peers .gpu-bundle/peers/*.whl \
      2>>"$out/bench.err" || return 3
    local bench_args="$bench_args --fallback-path /tmp/site-peers"
  fi
  bench "$1" "$2" "$out/plan-peers.jsonl"
}
export -f bench pipeline peers
export pipeline_pairs

# limits: 15 s for the peak, then 150 + 45 + 75 + 130 = 400 s for the four steps that matter most; the peers
# step (75 s) and the extra one run in what those leave (a second call runs them with GPU_RUN_SKIP)
step "core-$big" 150 bench "$big" "$pairs_big" "$out/plan-core.jsonl"
step "long-$big" 45 bench "$big" 2 "$out/plan-long.jsonl"
[ -n "$small" ] && step "core-$small" 75 bench "$small" "$pairs_small" "$out/plan-core.jsonl"
step pipeline "$pipeline_s" pipeline
step "peers-$big" 75 peers "$big" "$pairs_big"
step "extra-$big" 120 bench "$big" "$pairs_big" "$out/plan-extra.jsonl"
