#!/usr/bin/env bash
# The wheels a bare GPU machine lacks for scripts/gpu_check.sh, downloaded here, where PyPI is
# reachable, into gpu_wheels/ (gitignored; carry it to the GPU machine beside the working tree).
#   bash scripts/build_gpu_wheelhouse.sh
#
# The GPU machine this is for (docs/gpu_check.md): Python 3.12, torch 2.11 (CUDA 13),
# transformers (hence numpy), safetensors, tokenizers, pyyaml, tqdm, httpx; no megatron-core,
# Transformer Engine or SGLang; no network. The trainer step imports, beyond that image:
#   megatron-core 0.19.2  the newest before 0.20; needs torch>=2.6, numpy, packaging>=24.2
#                         (.ci/run's Python 3.12 leg tests it)
#   packaging>=24.2       megatron-core's floor (the image's may be older)
#   psutil                megatron's checkpoint writer imports it without declaring it
#   setuptools            builds repo-megatron itself for `pip install -e .` offline
# Never torch, CUDA or other compiled wheels of the image. Environment:
#   PYTHON (python3), GPU_WHEELS (gpu_wheels), GPU_PYTHON_VERSION (3.12),
#   GPU_PLATFORM (manylinux_2_28_x86_64; manylinux_2_28_aarch64 for a Grace Hopper node).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_WHEELS:-gpu_wheels}
REQUIREMENTS=("megatron-core==0.19.2" "packaging>=24.2" "psutil")
BUILD=("setuptools>=68")   # the build backend of pyproject.toml, used only to install the package
rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp \
    --platform "${GPU_PLATFORM:-manylinux_2_28_x86_64}" -d "$OUT" "${REQUIREMENTS[@]}" "${BUILD[@]}"
printf '%s\n' "${REQUIREMENTS[@]}" > "$OUT/requirements.txt"
ls -1 "$OUT"
echo "wheelhouse $OUT: $(du -sh "$OUT" | cut -f1); on the GPU machine: bash scripts/gpu_check.sh"
