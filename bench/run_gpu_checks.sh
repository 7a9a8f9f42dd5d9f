#!/usr/bin/env bash
# Run the TALAN vLLM GPU checks unattended (about 8 minutes on one H200).
# Needs vLLM's CUDA build (docker/ GPU image: vllm==0.33.0) and this repo installed
# (pip install -e . --no-deps, for the vllm.general_plugins entry point).
# Results: bench/results/gpu_h200/ (also copied to $OUT when the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results/gpu_h200
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/nvidia-smi.csv"
if ! $PY -c "import vllm, sys; print('vllm', vllm.__version__)"; then
    echo "vLLM (CUDA build) is not installed: use the GPU image (docker/) or pip install vllm==0.33.0" >&2
    exit 2
fi
$PY -m pip install -e . --no-deps -q >/dev/null 2>&1 || true
$PY -c "from importlib.metadata import entry_points as e; \
assert any(p.name == 'talan' for p in e(group='vllm.general_plugins')), 'talan plugin not installed'"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
timeout "${GPU_CHECK_TIMEOUT:-480}" $PY bench/gpu_check.py --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu_check.log"
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/ 2>/dev/null || true; fi
exit "$status"
