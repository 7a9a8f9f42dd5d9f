#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TALAN_SERVE_VENV:-.venv}"
./scripts/setup.sh "$venv"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -q -ra "$@"
