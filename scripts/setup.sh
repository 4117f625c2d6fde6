#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv, torch (the CUDA 13.0 build,
# so the CUDA kernels compile even with no GPU present), sparkct's dependencies and extras, and
# sparkct itself built in place (an editable install).
# Re-running is cheap: the pip steps run only when what they depend on changed (Python, this
# script, pyproject.toml, the torch requirement, the checkout's path: a stamp in the environment),
# and the extension build is incremental (setup.py: a persistent build folder where ninja
# recompiles only changed sources, and no link when nothing changed). Whether the CUDA kernels
# are compiled is decided, and said, by setup.py alone; the end of this script reports what was built.
#   SPARKCT_VENV      where the environment goes (default .venv)
#   SPARKCT_TORCH     torch requirement (default torch==2.14.1 torchvision==0.29.1)
#   SPARKCT_FORCE_CPU=1 / SPARKCT_FORCE_CUDA=1 / TORCH_CUDA_ARCH_LIST / MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SPARKCT_VENV:-.venv}
TORCH_SPEC=${SPARKCT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS="dev,dicom,spconv,cupy"
t0=$SECONDS

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Everything the pip steps depend on. The stamp is written only after they all succeeded.
stamp="$VENV/.sparkct-setup-stamp"
deps_key=$( { pwd; python -VV; echo "$TORCH_SPEC $EXTRAS"; cat scripts/setup.sh pyproject.toml; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$deps_key" ]; then
  deps_ok=1
  echo "== dependencies unchanged since the last set-up: pip skipped (rm $stamp to force it)"
else
  deps_ok=0
  rm -f "$stamp"
  # pip 23 with current setuptools breaks editable installs: upgrade first.
  python -m pip install -q --upgrade pip setuptools wheel
  echo "== installing $TORCH_SPEC"
  python -m pip install -q $TORCH_SPEC
  python -m pip install -q pybind11 ninja
fi

# Built here rather than inside pip, so that its progress shows (pip -q hides it) and so that pip's
# editable install below finds the library up to date. ninja prints one line per compiled source.
echo "== building sparkct._C (MAX_JOBS=$MAX_JOBS; only what changed is recompiled)"
python setup.py -q build_ext --inplace 2>&1 \
  | sed -u -E -e "s#^(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+) .*#\1 compiling \2#" -e "s#$PWD/##g"

if [ "$deps_ok" = 0 ]; then
  echo "== installing sparkct (editable) with extras [$EXTRAS]"
  python -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
  echo "$deps_key" > "$stamp"
fi

# What was built (the one source of truth for CUDA: the library itself).
python - <<'EOF'
import os, sys
from sparkct.cli import main
rc = main(["info"])
from sparkct import _ext
if not _ext.with_cuda() and not os.environ.get("SPARKCT_FORCE_CPU"):
    bar = "#" * 78
    print(f"{bar}\n## WARNING: sparkct was built WITHOUT its CUDA kernels: see the\n"
          f"## '[sparkct setup]' lines above for why.\n{bar}", file=sys.stderr)
sys.exit(rc)
EOF
echo "== set-up done in $((SECONDS - t0)) s. Use the environment: source $VENV/bin/activate"
echo "   (or call $VENV/bin/sparkct and $VENV/bin/python directly)"
