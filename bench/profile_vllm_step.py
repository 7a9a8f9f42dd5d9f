"""Where a TALAN decode step spends its extra time in vLLM, part by part.

Runs the plain host model and the TALAN model (LoRA merged, so no LoRA machinery in
either) in one process, drives ``LLMEngine.step`` itself, and times the parts of each
step that TALAN touches, in place (wrapped with timers for this run only): the
scheduler, the runner's batch update (where vLLM reorders batches for mamba-style
layers), the attention-metadata build (TALAN's builder inside it), the model forward
(the side-path op inside it) and ``TalanBlock.perturbation`` inside the op. Medians
over every decode step, TALAN minus base.

The side path is also timed "warm": called a second time at once with the same inputs.
The gap between that and the in-place time is what the step's other work costs it
(on this CPU the model's weights evict the side path's code and data from the caches
every step), which is why the block keeps its op count low.

    python bench/profile_vllm_step.py --batches 1 8 32 --out bench/results/vllm_step_parts_cpu
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_common import random_prompts, set_env  # noqa: E402

TIMES: dict[tuple[str, int, str], list[float]] = {}
CURRENT = {"engine": "warm-up", "batch": 0}
# Table order; indented parts are inside the part above them.
LABELS = ["scheduler.schedule", "runner._update_states", "  of which _may_reorder_batch",
          "runner attention metadata", "  of which TALAN's builder", "model forward",
          "  of which the side-path op", "    of which perturbation",
          "    perturbation again, warm"]
# Parts whose timing includes the profiler's extra warm call of perturbation.
WARM_REPEAT_INSIDE = {"model forward", "  of which the side-path op"}


def timed(owner: type, name: str, label: str) -> None:
    """Wrap ``owner.name`` so each call's wall time lands in TIMES under ``label``."""
    if not hasattr(owner, name):
        return
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        key = (CURRENT["engine"], CURRENT["batch"], label)
        TIMES.setdefault(key, []).append(time.perf_counter() - start)
        return result

    setattr(owner, name, wrapper)


def instrument() -> None:
    import vllm.v1.core.sched.scheduler as scheduler
    import vllm.v1.worker.gpu_model_runner as runner

    from talan_serve.block import TalanBlock
    from talan_serve.plugins.vllm import layer, state_backend

    timed(scheduler.Scheduler, "schedule", "scheduler.schedule")
    timed(runner.GPUModelRunner, "_update_states", "runner._update_states")
    timed(runner.GPUModelRunner, "_may_reorder_batch", "  of which _may_reorder_batch")
    timed(runner.GPUModelRunner, "_build_attention_metadata", "runner attention metadata")
    timed(state_backend.VllmStateMetadataBuilder, "build", "  of which TALAN's builder")
    timed(runner.GPUModelRunner, "_model_forward", "model forward")
    timed(layer.VllmStateLayer, "run", "  of which the side-path op")
    perturbation = TalanBlock.perturbation

    def perturbation_twice(self, *args, **kwargs):
        start = time.perf_counter()
        result = perturbation(self, *args, **kwargs)
        middle = time.perf_counter()
        perturbation(self, *args, **kwargs)
        end = time.perf_counter()
        key = (CURRENT["engine"], CURRENT["batch"])
        TIMES.setdefault((*key, "    of which perturbation"), []).append(middle - start)
        TIMES.setdefault((*key, "    perturbation again, warm"), []).append(end - middle)
        return result

    TalanBlock.perturbation = perturbation_twice


def run_batch(llm, prompts, max_tokens: int) -> list[float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine = llm.llm_engine
    for index, prompt in enumerate(prompts):
        engine.add_request(f"profile-{time.monotonic_ns()}-{index}",
                           {"prompt_token_ids": prompt}, params)
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="/tmp/talan-bench-vllm")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=None,
                        help="a TALAN checkpoint for SmolLM2 (default: a random T=3 one)")
    parser.add_argument("--out", default="bench/results/vllm_step_parts_cpu")
    args = parser.parse_args()
    work = Path(args.work_dir)
    set_env(work / "cache")
    import torch
    from vllm import LLM

    from talan_serve.base_models import default_model_dir
    from talan_serve.prepared import prepare_model_dir
    from talan_serve.testing import build_tiny_checkpoint

    base = default_model_dir()
    checkpoint = Path(args.checkpoint) if args.checkpoint else work / "checkpoint"
    if not (checkpoint / "talan_manifest.json").is_file():
        build_tiny_checkpoint(base, checkpoint, lora=True, alpha=0.008)
    merged = prepare_model_dir(checkpoint, work / f"served-merged-{checkpoint.name}",
                               base_model_dir=base, merge_lora=True)
    common = dict(dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=False,
                  max_model_len=32 + args.decode_tokens + 16,
                  max_num_seqs=max(8, *args.batches),
                  max_num_batched_tokens=max(2048, 32 * max(args.batches)))
    engines = {"base": LLM(str(base), **common), "talan": LLM(str(merged.path), **common)}
    instrument()
    steps: dict[tuple[str, int], list[float]] = {}
    for batch in args.batches:
        prompts = random_prompts(batch, 32, 49152, seed=batch)
        for llm in engines.values():
            CURRENT.update(engine="warm-up", batch=batch)
            run_batch(llm, prompts, 4)
        for _ in range(args.repeats):
            for name, llm in engines.items():
                CURRENT.update(engine=name, batch=batch)
                steps.setdefault((name, batch), []).extend(
                    run_batch(llm, prompts, args.decode_tokens)[1:])

    def median_us(engine: str, batch: int, label: str) -> float:
        values = TIMES.get((engine, batch, label))
        return statistics.median(values) * 1e6 if values else 0.0

    rows = []
    for batch in args.batches:
        step_base = statistics.median(steps[("base", batch)]) * 1e6
        step_talan = statistics.median(steps[("talan", batch)]) * 1e6
        warm_step = median_us("talan", batch, "    perturbation again, warm")
        rows.append(dict(batch=batch, part="whole decode step", base_us=step_base,
                         talan_us=step_talan - warm_step))
        for label in LABELS:
            base_us, talan_us = median_us("base", batch, label), median_us("talan", batch, label)
            if label in WARM_REPEAT_INSIDE:
                # This run calls perturbation twice; the step paid for the repeat too.
                warm = median_us("talan", batch, "    perturbation again, warm")
                talan_us -= warm
            rows.append(dict(batch=batch, part=label, base_us=base_us, talan_us=talan_us))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(base), talan=str(checkpoint), dtype="float32", eager=True,
                torch_threads=torch.get_num_threads(), prompt_len=32,
                decode_tokens=args.decode_tokens, repeats=args.repeats,
                vllm=__import__("vllm").__version__)
    record = json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n"
    out.parent.joinpath(f"{out.name}.json").write_text(record)
    lines = ["# Per-step parts of a decode step: plain host vs TALAN (merged LoRA), vLLM CPU",
             "", f"`python bench/profile_vllm_step.py` ({meta['vllm']}, fp32, eager, "
             f"{meta['torch_threads']} threads, SmolLM2-135M + {meta['talan']}, prompt 32, "
             f"{args.decode_tokens} new tokens x {args.repeats} runs). Median per decode "
             "step, microseconds; indented rows are inside the row above. The profiler "
             "calls perturbation a second time at once (the warm row); TALAN's step, "
             "forward and op exclude that repeat.", "",
             "| batch | part | base | TALAN | TALAN - base |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['part']} | {row['base_us']:.0f} | "
                     f"{row['talan_us']:.0f} | {row['talan_us'] - row['base_us']:+.0f} |")
    out.parent.joinpath(f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
