#!/usr/bin/env bash
# Set up (if needed) and serve a model: ./scripts/serve.sh [talan-serve args]
# With no arguments: the offline default, SmolLM2-135M-Instruct + the demo TALAN checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TALAN_SERVE_VENV:-.venv}"
./scripts/setup.sh "$venv"
export HF_HUB_OFFLINE=1
exec "$venv/bin/talan-serve" "$@"
