#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md), for a machine with one CUDA GPU and no network:
#   bash scripts/build_gpu_wheelhouse.sh    # here, where PyPI is reachable
#   bash scripts/gpu_check.sh               # there, with gpu_wheels/ carried beside the tree
# It makes a venv over the machine's torch (--system-site-packages), installs the wheelhouse and
# this package offline, and runs python -m repo_megatron.run.gpu_check: one line per check
# (ran / skipped and why / failed, with figures), then one JSON line. Exit status non-zero only
# when a check that ran failed. Without a CUDA GPU every check is skipped at once: no venv is
# made and nothing is installed.
# Environment:
#   PYTHON               the machine's Python with torch (default python3)
#   GPU_WHEELS           the wheelhouse (default gpu_wheels)
#   GPU_CHECK_VENV       the venv, reused by the next run (default .venv-gpu-check)
#   GPU_CHECK_BUDGET_S   seconds for all of it, install included (default 450)
#   GPU_CHECK_ALLOW_CPU=1  without a GPU, make the venv all the same and run the trainer check
#                        on the CPU (the dry run's tiny model, gloo): tests this harness
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-gpu_wheels}
VENV=${GPU_CHECK_VENV:-.venv-gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DRIVER=(-m repo_megatron.run.gpu_check)

has_gpu() {
    "$1" -c 'from repo_megatron.runtime.cpu_compat import has_gpu; raise SystemExit(not has_gpu())' \
        2>/dev/null
}
if ! has_gpu "$PY" && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    exec "$PY" "${DRIVER[@]}"     # each check says why it is skipped
fi

# pip of the venv, or (a Python without ensurepip) the machine's pip aimed at the venv
if [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
    PIP=("$VENV/bin/python" -m pip)
else
    rm -rf "$VENV"
    "$PY" -m venv --system-site-packages --without-pip "$VENV"
    PIP=("$PY" -m pip --python "$VENV/bin/python")
fi
install() {
    "${PIP[@]}" install --disable-pip-version-check -q --no-index --find-links "$WHEELS" "$@"
}
if [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "gpu_check: no wheelhouse in $WHEELS/ (make it with bash scripts/build_gpu_wheelhouse.sh" \
         "where PyPI is reachable and carry it here): the checks that need megatron-core skip" >&2
elif ! { install -r "$WHEELS/requirements.txt" && install --no-deps -e .; }; then
    echo "gpu_check: installing $WHEELS/ offline failed (above): checks that need it fail" >&2
fi
exec "$VENV/bin/python" "${DRIVER[@]}" --budget-s "$((BUDGET - SECONDS))"
