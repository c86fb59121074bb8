#!/usr/bin/env bash
# Set up (first time only), lint, and run the test suite; extra arguments go to pytest
# (e.g. ./test.sh -m "not slow" for the fast tests only).
# Lint = ruff check, ruff format --check and mypy (config in pyproject.toml); any failure
# stops the script before pytest. LINT=0 ./test.sh skips it, for a quick test loop.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements-dev.txt
if [ "${LINT:-1}" != 0 ]; then
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy
fi
exec .venv/bin/python -m pytest "$@"
