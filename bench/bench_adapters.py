"""Throughput with 1, 4 and 8 TALAN+LoRA adapters mixed in one batch, on one vLLM engine.

One engine holds 8 adapters: random TALAN+LoRA checkpoints built for the base model, of
``--kinds`` kinds (1: one recipe, different weights, so the engine stacks them all; up
to 4: cycling the four mixers and slot counts 2-5); ``--spread-points`` puts them at two
connection points. Each mode sends the same batch of prompts; request i runs adapter
``i mod k`` for k = 1, 4, 8 (uniform mix), with its LoRA per request. Slowdowns are k
adapters against 1 adapter, paired runs in ABBA order (``vllm_common``).

    python bench/bench_adapters.py --kinds 1 --out bench/results/adapters_cpu_smollm2
    python bench/bench_adapters.py --kinds 4 --out bench/results/adapters_cpu_smollm2_kinds4
"""

from __future__ import annotations

import argparse
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

MIXERS = ("multihead_local", "cross_attn", "gated_cross_attn", "per_token_mix")
COUNTS = (1, 4, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default=None,
                        help="host model folder (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--work-dir", default="/tmp/talan-bench-adapters")
    parser.add_argument("--batches", type=int, nargs="+", default=[32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--kinds", type=int, default=1, choices=(1, 2, 4),
                        help="distinct adapter kinds (mixer and T) among the 8")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS),
                        help="adapters mixed per batch, each a mode (1 is the baseline)")
    parser.add_argument("--lora-baseline", action="store_true",
                        help="also every count with TALAN off: the LoRAs alone, mixed the "
                             "same way, to tell TALAN's share from the LoRA path's")
    parser.add_argument("--spread-points", action="store_true",
                        help="adapters at two connection points (layer_4, layer_8) instead "
                             "of one (layer_4)")
    parser.add_argument("--out", default="bench/results/adapters_cpu_smollm2")
    parser.add_argument("--side-path-only", action="store_true",
                        help="only time the side path alone (no engine) and print it")
    return parser.parse_args()


def build_adapters(base: Path, work: Path, spread: bool, kinds: int) -> dict[int, Path]:
    from talan_serve.testing import build_tiny_checkpoint

    paths = {}
    for index in range(max(COUNTS)):
        point = "layer_8" if spread and index % 2 else "layer_4"
        kind = index % kinds
        path = work / f"adapter-{index}-{point}-kind{kind}"
        if not (path / "talan_manifest.json").is_file():
            build_tiny_checkpoint(base, path, seed=index, alpha=0.008,
                                  network_type=MIXERS[kind], n_themes=2 + kind,
                                  connection_point=point)
        paths[index + 1] = path
    return paths


def side_path_ms(checkpoints: dict, batch: int, repeats: int = 200) -> dict[str, float]:
    """The side path alone (``TalanAdapterSet.perturbation``) on a one-token step of
    ``batch`` rows, k adapters mixed: median ms per call, stacked and one call per adapter."""
    import statistics

    import numpy as np
    import torch

    from talan_serve.adapter_set import TalanAdapterSet
    from talan_serve.adapter_spec import AdapterSetSpec
    from talan_serve.step_plan import plan_groups

    configs = [c.config for c in checkpoints.values()]
    adapters = TalanAdapterSet(AdapterSetSpec.covering(configs, configs[0].hidden_size,
                                                       max_adapters=max(COUNTS)))
    for adapter, checkpoint in checkpoints.items():
        adapters.add(adapter, checkpoint.config, checkpoint.state_dict)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, configs[0].hidden_size, generator=generator)
    initial = torch.rand(batch, *adapters.state_shape, generator=generator)
    timings = {}
    for k in COUNTS:
        rows = np.array([1 + i % k for i in range(batch)], dtype=np.int64)
        for label, stacks in (("stacked", adapters.stack_of), ("per adapter", None)):
            if k == 1 and stacks is None:
                continue
            groups = plan_groups(rows, None, None, torch.device("cpu"), None, stacks)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                adapters.perturbation(hidden, None, initial, groups)
                times.append(time.perf_counter() - start)
            timings[f"{k} adapter{'s' if k > 1 else ''}" + ("" if k == 1 else f", {label}")] = \
                round(statistics.median(times) * 1e3, 3)
    return timings


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    set_env(work / "cache")
    import torch
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from talan_serve.adapter_spec import AdapterSetSpec
    from talan_serve.base_models import default_model_dir
    from talan_serve.checkpoint import load_checkpoint
    from talan_serve.prepared import prepare_adapter_base
    from talan_serve.switch import switch_args

    base = Path(args.base_model) if args.base_model else default_model_dir()
    checkpoints = {i: load_checkpoint(p)
                   for i, p in build_adapters(base, work, args.spread_points,
                                              args.kinds).items()}
    if args.side_path_only:
        print(side_path_ms(checkpoints, max(args.batches)))
        return
    spec = AdapterSetSpec.covering([c.config for c in checkpoints.values()],
                                   checkpoints[1].config.hidden_size, max_adapters=max(COUNTS))
    folder = prepare_adapter_base(base, work / "prepared", spec)
    max_batch = max(args.batches)
    start = time.perf_counter()
    llm = LLM(str(folder), dtype="float32", enforce_eager=True, seed=0,
              max_model_len=args.prompt_len + args.decode_tokens + 16,
              max_num_seqs=max(max_batch, 8), enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, max_batch * args.prompt_len),
              enable_lora=True, max_loras=len(checkpoints), max_lora_rank=8)
    for adapter, checkpoint in checkpoints.items():
        llm.collective_rpc("talan_load_adapter", args=(adapter, str(checkpoint.path)))
    print(f"engine up with {len(checkpoints)} adapters in {time.perf_counter() - start:.1f}s",
          flush=True)
    loras = {a: LoRARequest(f"adapter-{a}", a, str(c.adapter_dir))
             for a, c in checkpoints.items()}

    side_path = side_path_ms(checkpoints, max(args.batches))
    print(f"side path alone, ms per one-token step: {side_path}", flush=True)
    counts = sorted(set(args.counts) | {1})
    variants = [True, False] if args.lora_baseline else [True]
    modes = [(Mode(_mode_name(k, talan), "many", talan=talan, lora=True), k)
             for talan in variants for k in counts]
    vocab = 49152 if args.base_model is None else 1000
    points = []
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, vocab, seed=batch)
        routes = {
            mode.name: [(switch_args(mode.talan, 1 + i % k if mode.talan else None),
                         loras[1 + i % k]) for i in range(batch)]
            for mode, k in modes
        }
        for point in measure_interleaved({"many": llm}, [m for m, _ in modes], prompts,
                                         args.decode_tokens, args.repeats, None, routes):
            print(f"  {point.mode:24s} batch {batch:3d}: e2e {point.e2e_tok_s:8.1f} tok/s, "
                  f"decode {point.decode_tok_s:8.1f} tok/s", flush=True)
            points.append(point)

    meta = dict(
        title=f"{base.name}, float32, eager, 8 TALAN+LoRA adapters of {args.kinds} "
              f"kind{'s' if args.kinds > 1 else ''} loaded",
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                f"{platform.processor() or 'cpu'}",
        vllm=__import__("vllm").__version__,
        adapters=", ".join(f"{c.config.network_type}/T={c.config.n_themes}/"
                           f"{c.config.connection_point}" for c in checkpoints.values()),
        state_slots=spec.state_slots,
        side_path_ms=f"{side_path} (the side path alone, one-token step of batch "
                     f"{max(args.batches)}, median of 200 calls)",
        prompt_len=args.prompt_len,
        decode_tokens=args.decode_tokens,
        repeats=f"{args.repeats} runs per mode, modes taking turns in ABBA order; request i "
                "runs adapter i mod k (LoRA per request)",
    )
    comparisons = tuple((f"{mode.name} vs {_mode_name(1, mode.talan)}, same engine", mode.name,
                         _mode_name(1, mode.talan)) for mode, k in modes if k > 1)
    write_results(Path(args.out), meta, points, comparisons=comparisons)


def _mode_name(count: int, talan: bool) -> str:
    name = f"{count} adapter{'s' if count > 1 else ''}"
    return name if talan else f"{name}, TALAN off"


if __name__ == "__main__":
    main()
