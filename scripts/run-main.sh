#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on built-in default data: the small-data experiment
# (sparkct experiment): synthetic chest CT -> pretraining with SparK, SimCLR, MoCo v2, SwAV, BYOL ->
# fine-tuning of each and of random init on 100/50/25/10 % of the labelled patients over two seeds ->
# test AUC with bootstrap CIs and paired tests -> runs/experiment/results.md, auc_vs_fraction.png,
# results.json, runs.csv. Extra arguments go to `sparkct experiment` (e.g. --methods random,spark).
# Re-running skips finished runs and resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SPARKCT_VENV:-.venv}
exec "$VENV/bin/sparkct" experiment "$@"
