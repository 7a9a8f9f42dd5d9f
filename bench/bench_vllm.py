"""Decode and end-to-end throughput of TALAN+LoRA vs LoRA-only vs base in real vLLM.

One run, one process, engines with identical settings:

* ``talan``: the TALAN model (prepare_model_dir), LoRA served per request
  -> modes ``talan+lora`` and ``talan-off+lora`` (the per-request off switch);
* ``host``: the plain host model with vLLM LoRA on -> ``lora-only``;
* ``plain``: the plain host model, no LoRA machinery -> ``base``;
* ``talan-merged``: TALAN with the LoRA merged into the weights -> ``talan-merged``
  (same cost as TALAN over a merged LoRA; compare with ``base``).

Writes ``<out>.json`` and ``<out>.md`` (points and slowdown ratios). Default: SmolLM2-135M
(fp32, CPU) with a small random TALAN+LoRA checkpoint built for it.

    python bench/bench_vllm.py --batches 1 8 32 --out bench/results/vllm_cpu_smollm2
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_common import (  # noqa: E402
    Mode,
    measure_interleaved,
    random_prompts,
    set_env,
    write_results,
)

MODES = [
    Mode("talan+lora", "talan", talan=True, lora=True),
    Mode("talan-off+lora", "talan", talan=False, lora=True),
    Mode("lora-only", "host", talan=True, lora=True),
    Mode("base", "plain", talan=True, lora=False),
    Mode("talan-merged", "talan-merged", talan=True, lora=False),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default=None,
                        help="host model folder (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--checkpoint", default=None,
                        help="TALAN checkpoint (default: a random tiny one for the host)")
    parser.add_argument("--work-dir", default="/tmp/talan-bench-vllm")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="enforce_eager (CPU default); --no-eager for compiled/graphs")
    parser.add_argument("--out", default="bench/results/vllm_cpu_smollm2")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    set_env(work / "cache")
    import torch
    from vllm import LLM

    from talan_serve.engines.vllm import prepare_model_dir
    from talan_serve.models import default_model_dir
    from talan_serve.testing import build_tiny_checkpoint

    base = Path(args.base_model) if args.base_model else default_model_dir()
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        checkpoint = work / "checkpoint"
        if not (checkpoint / "talan_manifest.json").is_file():
            build_tiny_checkpoint(base, checkpoint, lora=True, alpha=0.008)
    prepared = prepare_model_dir(checkpoint, work / "served", base_model_dir=base)
    merged = prepare_model_dir(checkpoint, work / "served-merged", base_model_dir=base,
                               merge_lora=True)
    paths = {"talan": prepared.path, "host": base, "plain": base, "talan-merged": merged.path}
    max_batch = max(args.batches)
    common = dict(dtype=args.dtype, enforce_eager=args.eager, seed=0,
                  max_model_len=args.prompt_len + args.decode_tokens + 16,
                  max_num_seqs=max(max_batch, 8), enable_prefix_caching=False,
                  max_num_batched_tokens=max(2048, max_batch * args.prompt_len))
    vocab = 49152 if args.base_model is None else 1000
    # All engines up at once, modes taking turns (vllm_common.measure_interleaved).
    engines = {}
    for engine_name in paths:
        lora = engine_name in ("talan", "host")
        options = dict(common, enable_lora=True, max_lora_rank=prepared.max_lora_rank,
                       max_loras=1) if lora else dict(common)
        start = time.perf_counter()
        engines[engine_name] = LLM(str(paths[engine_name]), **options)
        print(f"[{engine_name}] engine up in {time.perf_counter() - start:.1f}s", flush=True)
    points = []
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, vocab, seed=batch)
        for point in measure_interleaved(engines, MODES, prompts, args.decode_tokens,
                                         args.repeats, prepared.lora_request()):
            print(f"  {point.mode:15s} batch {batch:3d}: e2e {point.e2e_tok_s:8.1f} tok/s, "
                  f"decode {point.decode_tok_s:8.1f} tok/s", flush=True)
            points.append(point)
    engines.clear()
    gc.collect()

    meta = dict(
        title=f"{base.name}, {args.dtype}, {'eager' if args.eager else 'compiled'}",
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                f"{platform.processor() or 'cpu'}",
        vllm=__import__("vllm").__version__,
        base_model=str(base), checkpoint=str(checkpoint),
        prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
        repeats=f"best of {args.repeats}, modes interleaved",
    )
    write_results(Path(args.out), meta, points)


if __name__ == "__main__":
    main()
