#!/usr/bin/env bash
# Set up (first time only) and start the app with the default model; flags go to app.py.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements.txt
exec .venv/bin/python app.py "$@"
