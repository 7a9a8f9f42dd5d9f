#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TALAN_SERVE_VENV:-.venv}"
./scripts/setup.sh "$venv"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Tools the test extra installs (hadolint, talan-serve, lm_eval) resolve from the venv.
export PATH="$(cd "$venv" && pwd)/bin:$PATH"
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -q -ra "$@"
