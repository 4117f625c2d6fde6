#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SPARKCT_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q tests "$@"
