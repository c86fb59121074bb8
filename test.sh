#!/usr/bin/env bash
# Set up (first time only) and run the test suite; extra arguments go to pytest
# (e.g. ./test.sh -m "not slow" for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
