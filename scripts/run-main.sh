#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on built-in default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SPARKCT_VENV:-.venv}
exec "$VENV/bin/sparkct" info
