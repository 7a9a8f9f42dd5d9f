#!/usr/bin/env bash
# Run the TALAN GPU checks unattended (about 9 minutes on one H200). The block checks
# (bench/gpu_block_check.py) need torch only; the engine checks need vLLM's CUDA build
# (docker/ GPU image: vllm==0.33.0) and this repo installed (pip install -e . --no-deps,
# for the vllm.general_plugins entry point).
# Results: bench/results/gpu_h200/ (also copied to $OUT when that is set).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results/gpu_h200
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/nvidia-smi.csv"
export PYTHONUNBUFFERED=1
# Torch only, about a minute: block parity on CUDA, the decode step under CUDA graph
# replay, and its cost at Qwen3-8B shape. Runs even where vLLM is missing.
$PY bench/gpu_block_check.py --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu_block_check.log"
block_status=${PIPESTATUS[0]}
# SGLang's engine checks, where its environment exists (SGLANG_PYTHON, e.g.
# .venv-sglang/bin/python): bf16 ids with CUDA graphs on, off and deterministic.
if [ -n "${SGLANG_PYTHON:-}" ]; then
    "$SGLANG_PYTHON" bench/sglang_gpu_check.py --out "$RESULTS" 2>&1 | tee "$RESULTS/sglang_gpu_check.log"
fi
if ! $PY -c "import vllm, sys; print('vllm', vllm.__version__)"; then
    echo "vLLM (CUDA build) is not installed: use the GPU image (docker/) or pip install vllm==0.33.0" >&2
    if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/ 2>/dev/null || true; fi
    exit 2
fi
$PY -m pip install -e . --no-deps -q >/dev/null 2>&1 || true
$PY -c "from importlib.metadata import entry_points as e; \
assert any(p.name == 'talan' for p in e(group='vllm.general_plugins')), 'talan plugin not installed'"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
timeout "${GPU_CHECK_TIMEOUT:-480}" $PY bench/gpu_check.py --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu_check.log"
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/ 2>/dev/null || true; fi
[ "$block_status" -eq 0 ] || status=1
exit "$status"
