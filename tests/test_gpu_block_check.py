"""The GPU script's block checks, run on CPU so that a lent GPU's minutes are not lost to
a broken script. Stand-in: the CUDA graph is replaced by eager execution here; the GPU
run (bench/run_gpu_checks.sh) captures and replays it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_block_check  # noqa: E402


def test_parity_check_passes_on_cpu():
    result = gpu_block_check.check_parity("cpu")
    assert result["ok"], result
    assert result["max_abs_diff_stepwise"] < 1e-5


def test_decode_step_mass_check_on_cpu():
    result = gpu_block_check.check_cuda_graph("cpu")
    assert result["ok"], result
    # Rows 3 and 7 are TALAN-off: their state never moves; the others absorb one token.
    first = result["mass_steps_first"][0]
    assert [round(m, 4) for m in first] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_sglang_step_check_on_cpu():
    result = gpu_block_check.check_sglang_step("cpu")
    assert result["ok"], result
    # The dense (capturable) step against the planned one, one adapter loaded in between.
    assert result["max_abs_diff_graph_vs_eager"] < 1e-5
