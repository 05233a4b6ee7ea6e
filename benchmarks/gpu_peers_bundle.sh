#!/usr/bin/env bash
# Packs TRL for the GPU machine (no network; torch and transformers only): the wheels of TRL, accelerate and
# datasets and of what they need beyond torch and transformers, into the git-ignored .gpu-bundle/peers/, for
# gpu_run.sh's `peers` step (TRL's reference precompute beside mapray's torch engine). The versions are this
# venv's, so the GPU numbers are those of the TRL the CPU tables measured. gpu_run.sh installs them into a
# folder that bench_scoring.py appends to sys.path (--fallback-path): they fill in what the GPU image lacks and
# shadow nothing it has.
#
#   bash benchmarks/gpu_peers_bundle.sh      from the repo root, after ../shared/tools/gpu-ray-bundle.sh
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
out=.gpu-bundle/peers
rm -rf "$out" && mkdir -p "$out"
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# the GPU machine's Python, 3.12 (the Ray bundle's wheels are for it too; GPU_PYTHON_VERSION changes it)
plat="--only-binary=:all: --python-version ${GPU_PYTHON_VERSION:-3.12} --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
wheels=()
for name in trl accelerate datasets dill multiprocess xxhash psutil; do wheels+=("$name==$(version "$name")"); done
# shellcheck disable=SC2086  # plat is several options
"$py" -m pip download -q --no-deps $plat -d "$out" "${wheels[@]}"
du -sh "$out"; ls "$out"
