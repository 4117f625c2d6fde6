#!/usr/bin/env bash
# The static checks CI runs (after scripts/setup.sh, in its environment): the layer contracts
# (import-linter, pyproject.toml [tool.importlinter]), ruff (lint + format), mypy, and the strict docs
# build (a broken link or API reference fails). Each check is configured in pyproject.toml or mkdocs.yml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPARKCT_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
echo "== lint-imports (layers)"; lint-imports
echo "== ruff check";  ruff check .
echo "== ruff format"; ruff format --check .
echo "== mypy";        mypy
echo "== docs";        mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
echo "== lint done"
