#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on built-in default data: the small-data experiment
# (sparkct experiment): synthetic chest CT (240 labelled patients, half with 30-45 mm findings; a pool of
# 48 other patients for pretraining) -> SparK pretraining (16 epochs) -> fine-tuning of it and of random
# init for 150 steps on 100 % and 10 % of the labelled training patients, a linear probe beside each ->
# test AUC on 84 held-out patients with bootstrap CIs and paired tests -> runs/experiment/results.md,
# auc_vs_fraction.png, convergence.png, robustness.png, results.json, runs.csv. Extra arguments go to
# `sparkct experiment` (e.g. --methods random,spark,simclr,moco,swav,byol for every method).
# Re-running skips finished runs and resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SPARKCT_VENV:-.venv}
exec "$VENV/bin/sparkct" experiment "$@"
