#!/usr/bin/env bash
# Set up everything on a fresh machine (idempotent; re-running rebuilds only what changed):
# a virtual environment in .venv, torch (the CUDA 13.0 build, so the CUDA kernels compile even
# with no GPU present), sparkct's dependencies and extras, and sparkct itself built in place.
#   SPARKCT_VENV      where the environment goes (default .venv)
#   SPARKCT_TORCH     torch requirement (default torch==2.14.1 torchvision==0.29.1)
#   SPARKCT_FORCE_CPU=1 / TORCH_CUDA_ARCH_LIST / MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SPARKCT_VENV:-.venv}
TORCH_SPEC=${SPARKCT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# pip 23 with current setuptools breaks editable installs: upgrade first.
python -m pip install -q --upgrade pip setuptools wheel
echo "== installing $TORCH_SPEC"
python -m pip install -q $TORCH_SPEC
python -m pip install -q pybind11 ninja

if [ -z "${SPARKCT_FORCE_CPU:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  echo "############################################################################" >&2
  echo "## WARNING: nvcc not found: building sparkct WITHOUT its CUDA kernels.    ##" >&2
  echo "## Install the CUDA toolkit (or set CUDA_HOME) to compile them.            ##" >&2
  echo "############################################################################" >&2
fi
echo "== building sparkct"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
python -m pip install -q --no-build-isolation -e ".[dev,dicom,spconv,cupy]"
sparkct info
