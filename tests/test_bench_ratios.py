"""The engine benchmark's slowdown ratios: paired runs, not pooled medians."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from vllm_common import Point, ratios, write_results  # noqa: E402


def point(mode: str, runs: list[float], step: float | None = None) -> Point:
    """``step``: the median over all steps pooled (default: the middle run's)."""
    step = step or sorted(runs)[len(runs) // 2]
    return Point(mode=mode, batch=8, prompt_len=32, decode_tokens=64, e2e_seconds=1.0,
                 prefill_seconds=0.1, decode_step_ms=step, e2e_tok_s=100.0,
                 decode_tok_s=8 / step * 1e3, e2e_seconds_runs=[r / 10 for r in runs],
                 decode_step_ms_runs=runs)


def test_decode_slowdown_is_the_median_of_paired_runs():
    # The host slows down by 30% over the repeats; TALAN costs 1% within each repeat.
    # Pooled medians that caught the drift unevenly (12.0 vs 13.0 ms) would say 0.92x.
    points = [point("talan+lora", [10.1, 12.12, 13.13], step=12.0),
              point("talan-off+lora", [10.0, 12.0, 13.0], step=13.0)]
    (row,) = ratios(points)
    assert row["comparison"].startswith("TALAN+LoRA vs LoRA-only, same engine")
    assert row["decode_slowdown_runs"] == [10.1 / 10.0, 12.12 / 12.0, 13.13 / 13.0]
    assert abs(row["decode_slowdown"] - 1.01) < 1e-9
    assert abs(row["e2e_slowdown"] - 1.01) < 1e-9


def test_gpu_runs_leave_out_same_engine_ratios(tmp_path):
    points = [point("talan+lora", [10.1]), point("talan-off+lora", [10.0]),
              point("lora-only", [10.0])]
    assert [r["comparison"] for r in ratios(points, same_engine=False)] == [
        "TALAN+LoRA vs LoRA-only, host engine", "LoRA-only: TALAN engine (off) vs host engine"]
    write_results(tmp_path / "gpu-0.6b", {"title": "t"}, points, same_engine=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-0.6b.json", "gpu-0.6b.md"]
    table = (tmp_path / "gpu-0.6b.md").read_text()
    row = ("| TALAN+LoRA vs LoRA-only, host engine | 8 | 1.010x | 1.010-1.010 | 1.010x "
           "| 1.010-1.010 |")
    assert row in table
    assert "same engine" not in table


def test_interleaved_probe_counts_each_gap_for_the_window_that_holds_it():
    from bench_adapter_library import gaps_by_window

    # Tokens every 1 s, then 1.5 s apart; windows: quiet [0, 3.2), loading [3.2, 9).
    stamps = [0.0, 1.0, 2.0, 3.0, 4.5, 6.0, 7.5]
    windows = [(0.0, 3.2, False), (3.2, 9.0, True)]
    gaps = gaps_by_window([stamps, stamps], windows)
    # The first gap (0 -> 1) is the prefill's; 3.0 -> 4.5 crosses an edge: neither.
    assert gaps == {False: [1.0, 1.0, 1.0, 1.0], True: [1.5, 1.5, 1.5, 1.5]}
