"""Cost of one TalanBlock call: packed entry vs the decode-step entry, on this machine.

    python bench/bench_block.py [--checkpoint checkpoints/smollm2-talan-demo] [--threads 1]

Times ``TalanBlock.perturbation`` for decode batches (one token per sequence with carried
states) through the packed entry (``cu_seqlens = arange``) and the decode-step entry
(``cu_seqlens=None``), which skip the scan. Writes ``bench/results/block_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from talan_serve.block import TalanBlock
from talan_serve.config import TalanConfig

REPO = Path(__file__).resolve().parents[1]


def time_call(fn, args: tuple, repeats: int) -> float:
    for _ in range(min(50, repeats)):
        fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "smollm2-talan-demo"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "block_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TalanConfig.load(args.checkpoint)
    block = TalanBlock(config).eval()
    rows = []
    for batch in (1, 8, 32):
        hidden = torch.randn(batch, config.hidden_size)
        state = torch.rand(batch, config.n_themes, config.hidden_size + 1) * 4
        cu_seqlens = torch.arange(batch + 1)
        packed = time_call(block.perturbation, (hidden, cu_seqlens, state), args.repeats)
        step = time_call(block.perturbation, (hidden, None, state), args.repeats)
        rows.append({"batch": batch, "packed_us": round(packed * 1e6, 1),
                     "decode_step_us": round(step * 1e6, 1)})
        print(f"batch {batch:3d}: packed {packed * 1e6:7.1f} us, decode step {step * 1e6:7.1f} us")
    record = {"config": config.to_dict(), "threads": args.threads,
              "machine": platform.machine(), "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
