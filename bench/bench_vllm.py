"""Decode and end-to-end throughput of TALAN+LoRA vs LoRA-only vs base in real vLLM.

One run, one process, engines with identical settings:

* ``talan``: the TALAN model (prepare_model_dir), LoRA served per request
  -> ``talan+lora``, and ``talan-off+lora``: every request TALAN-off, so the engine
  skips the side path and serves exactly the LoRA-only model (the same engine instance,
  the cleanest baseline);
* ``host``: the plain host model with vLLM LoRA on -> ``lora-only``;
* ``plain``: the plain host model, no LoRA machinery -> ``base``;
* ``talan-merged``: TALAN with the LoRA merged into the weights -> ``talan-merged``,
  and ``talan-merged-off`` (its base model on the same engine instance).

Two identically configured engines in one process differ by up to ~5% per decode step
on this host (memory placement), so the same-instance ratios are the ones that isolate
TALAN; the cross-engine ones are reported next to them.

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
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_common  # noqa: E402
from vllm_common import (  # noqa: E402
    Mode,
    measure_interleaved,
    random_prompts,
    set_env,
    shape_config,
    write_random_lora,
    write_results,
    write_shape_model,
)

MODES = [
    Mode("talan+lora", "talan", talan=True, lora=True),
    Mode("talan-off+lora", "talan", talan=False, lora=True),
    Mode("lora-only", "host", talan=True, lora=True),
    Mode("base", "plain", talan=True, lora=False),
    Mode("talan-merged", "talan-merged", talan=True, lora=False),
    Mode("talan-merged-off", "talan-merged", talan=False, lora=False),
]
# --shape runs: which of its two engines serves the modes of the engines it lacks.
SHARED_ENGINE = {"plain": "host", "talan-merged": "talan"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default=None,
                        help="host model folder (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--checkpoint", default=None,
                        help="TALAN checkpoint (default: a random tiny one for the host)")
    parser.add_argument("--shape", default=None, choices=sorted(vllm_common.SHAPES),
                        help="random weights at a named host shape instead (bf16; TALAN and "
                             "LoRA random too): the cost of the same side path at a larger "
                             "model")
    parser.add_argument("--work-dir", default="/tmp/talan-bench-vllm")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--dtype", default=None,
                        help="default: float32, or bfloat16 with --shape")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="enforce_eager (CPU default); --no-eager for compiled/graphs")
    parser.add_argument("--modes", nargs="+", default=[m.name for m in MODES],
                        choices=[m.name for m in MODES],
                        help="measure only these (and build only their engines)")
    parser.add_argument("--out", default="bench/results/vllm_cpu_smollm2")
    return parser.parse_args()


def shape_engines(work: Path, shape: str):
    """Engine folders for random weights at a named shape (no tokenizer, dummy load)."""
    from vllm.lora.request import LoRARequest

    vllm_common.DETOKENIZE = False
    config = shape_config(shape)[0]
    talan = write_shape_model(work / f"{shape}-talan", True, shape)
    host = write_shape_model(work / f"{shape}-host", False, shape)
    adapter = write_random_lora(work / f"{shape}-lora", config, rank=16)
    # Two engines only (memory): "base" and "talan-merged" run without a LoRARequest on
    # the LoRA-enabled host and TALAN engines.
    paths = {"talan": talan, "host": host}
    extra = dict(load_format="dummy", skip_tokenizer_init=True)
    return paths, LoRARequest("bench-lora", 1, str(adapter)), config.vocab_size, extra, 16


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    set_env(work / "cache")
    import torch
    from vllm import LLM

    from talan_serve.base_models import default_model_dir
    from talan_serve.plugins.vllm import lora_request, max_lora_rank
    from talan_serve.prepared import prepare_model_dir
    from talan_serve.testing import build_tiny_checkpoint

    if args.shape:
        engine_paths, lora_request, vocab, extra, lora_rank = shape_engines(work, args.shape)
        title, checkpoint = f"{args.shape} shape, random weights", f"random ({args.shape})"
        args.dtype = args.dtype or "bfloat16"
    else:
        base = Path(args.base_model) if args.base_model else default_model_dir()
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            checkpoint = work / "checkpoint"
            if not (checkpoint / "talan_manifest.json").is_file():
                build_tiny_checkpoint(base, checkpoint, lora=True, alpha=0.008)
        prepared = prepare_model_dir(checkpoint, work / "served", base_model_dir=base)
        merged = prepare_model_dir(checkpoint, work / "served-merged", base_model_dir=base,
                                   merge_lora=True)
        engine_paths = {"talan": prepared.path, "host": base, "plain": base,
                        "talan-merged": merged.path}
        lora_request, lora_rank, extra = lora_request(prepared), max_lora_rank(prepared), {}
        vocab = 49152 if args.base_model is None else 1000
        title = base.name
        args.dtype = args.dtype or "float32"
    max_batch = max(args.batches)
    common = dict(dtype=args.dtype, enforce_eager=args.eager, seed=0,
                  max_model_len=args.prompt_len + args.decode_tokens + 16,
                  max_num_seqs=max(max_batch, 8), enable_prefix_caching=False,
                  max_num_batched_tokens=max(2048, max_batch * args.prompt_len), **extra)
    wanted = [m for m in MODES if m.name in args.modes]
    needed = {m.engine if m.engine in engine_paths else SHARED_ENGINE[m.engine] for m in wanted}
    # All engines up at once, modes taking turns (vllm_common.measure_interleaved).
    engines = {}
    for engine_name, path in engine_paths.items():
        if engine_name not in needed:
            continue
        lora = engine_name in ("talan", "host")  # --shape: "base" = host, no LoRARequest
        options = dict(common, enable_lora=True, max_lora_rank=lora_rank,
                       max_loras=1) if lora else dict(common)
        start = time.perf_counter()
        engines[engine_name] = LLM(str(path), **options)
        print(f"[{engine_name}] engine up in {time.perf_counter() - start:.1f}s", flush=True)
    modes = [replace(m, engine=m.engine if m.engine in engines else SHARED_ENGINE[m.engine])
             for m in wanted]
    points = []
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, vocab, seed=batch)
        for point in measure_interleaved(engines, modes, prompts, args.decode_tokens,
                                         args.repeats, lora_request):
            print(f"  {point.mode:15s} batch {batch:3d}: e2e {point.e2e_tok_s:8.1f} tok/s, "
                  f"decode {point.decode_tok_s:8.1f} tok/s", flush=True)
            points.append(point)
    engines.clear()
    gc.collect()

    meta = dict(
        title=f"{title}, {args.dtype}, {'eager' if args.eager else 'compiled'}",
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                f"{platform.processor() or 'cpu'}",
        vllm=__import__("vllm").__version__,
        model=title, checkpoint=str(checkpoint),
        prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
        repeats=f"{args.repeats} runs per mode, modes taking turns in ABBA order; tok/s: "
                "best run (e2e), median step over all runs (decode); slowdowns: medians "
                "of paired runs",
    )
    write_results(Path(args.out), meta, points)


if __name__ == "__main__":
    main()
