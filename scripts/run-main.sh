#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on built-in default data: synthetic chest CT ->
# prepared slice cache -> SparK sparse encoder and fused InfoNCE, checked against the references and
# timed (sparkct/pipeline.py). Extra arguments go to `sparkct pipeline` (e.g. --dicom DIR, --arch resnet50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SPARKCT_VENV:-.venv}
exec "$VENV/bin/sparkct" pipeline "$@"
