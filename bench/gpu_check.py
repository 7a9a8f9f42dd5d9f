"""GPU checks of TALAN in vLLM (CUDA build), unattended, about 8 minutes on one H200.

1. ``graphs``: CUDA graphs + torch.compile vs enforce_eager on a tiny random Qwen3 with
   TALAN+LoRA, greedy ids on 8 prompts of 1-300 tokens, 48 new tokens each. fp32: ids
   must be equal. bf16: equal, or TALAN-on requests stay equal on average at least 90% as
   long as TALAN-off (LoRA-only) requests of the same engines: kernels round differently
   with and without graphs, TALAN must add no divergence of its own (docs/design.md,
   "Properties": parity).
2. ``every_token``: in the graph engine, step by step, each request's state mass
   ``sum_t D[t]`` (= tokens absorbed) equals the prompt length after prefill and grows
   by exactly 1 per decode step, i.e. the side path ran inside the replayed graphs.
3. ``throughput``: Qwen3-8B shape (random weights, ``load_format="dummy"``), bf16, CUDA
   graphs, TALAN preset q8b: TALAN+LoRA vs LoRA-only vs base (+ TALAN without LoRA,
   the cost of TALAN with a merged LoRA, and TALAN-off), batch 1/8/32, one run.

Each part records ``ok``/``error`` in ``<out>/gpu_check.json`` and keeps going; the exit
status is 1 if any part failed. Needs vLLM's CUDA build (the GPU image, ``vllm==0.33.0``).

    python bench/gpu_check.py --out bench/results/gpu_h200
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_common  # noqa: E402
from vllm_common import (  # noqa: E402
    Mode,
    measure_interleaved,
    random_prompts,
    set_env,
    shape_config,
    write_results,
    write_shape_model,
)

CAPTURE_SIZES = [1, 2, 4, 8, 16, 32]


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def release() -> None:
    """Return GPU memory of engines the caller has already dropped (``del``)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def engine(path: Path, eager: bool, **kwargs):
    from vllm import LLM

    options = dict(dtype="bfloat16", enforce_eager=eager, seed=0, max_model_len=1024,
                   max_num_seqs=32, enable_prefix_caching=False, gpu_memory_utilization=0.40)
    if not eager:
        options["compilation_config"] = {"cudagraph_capture_sizes": CAPTURE_SIZES}
    options.update(kwargs)
    start = time.perf_counter()
    llm = LLM(str(path), **options)
    log(f"engine {path.name} eager={eager} up in {time.perf_counter() - start:.0f}s")
    return llm


def greedy(llm, prompts, talan: bool, lora_request, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    from talan_serve.switch import switch_args

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            extra_args=switch_args(talan))
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                           lora_request=lora_request, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def graphs_vs_eager(prepared, dtype: str, prompts, lora, lora_options) -> dict:
    """Greedy ids of eager vs compiled+graphs engines; bf16 also runs the state probe."""
    from talan_serve.plugins.vllm.probe import stepwise_state_masses

    ids = {}
    probe = None
    for eager in (True, False):
        # Small share of the GPU: the 8B-shape engines of the next part need 0.80.
        # Synchronous scheduling: the state mass is read between steps.
        llm = engine(prepared.path, eager, gpu_memory_utilization=0.08, dtype=dtype,
                     async_scheduling=False, **lora_options)
        ids[eager] = {on: greedy(llm, prompts, on, lora, 48) for on in (True, False)}
        if not eager and dtype == "bfloat16":
            mass_prompts = [prompts[1], prompts[3], prompts[5]]
            history = stepwise_state_masses(llm, mass_prompts, [True] * len(mass_prompts),
                                            24, lora)
            mode = str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)
            probe = (history, mass_prompts, mode)
        del llm
        release()
    eager_ids, graph_ids = ids[True], ids[False]
    on_div = [first_divergence(a, b)
              for a, b in zip(eager_ids[True], graph_ids[True], strict=True)]
    off_div = [first_divergence(a, b)
               for a, b in zip(eager_ids[False], graph_ids[False], strict=True)]
    log(f"graphs {dtype}: on={on_div} off={off_div}")
    result = dict(
        greedy_ids_equal=all(d == 48 for d in on_div),
        talan_on_first_divergence=on_div, talan_off_first_divergence=off_div,
        mean_on=sum(on_div) / len(on_div), mean_off=sum(off_div) / len(off_div),
    )
    if probe is not None:
        result["_probe"] = probe
    return result


def check_graphs_and_every_token(work: Path, results: dict) -> None:
    from talan_serve.plugins.vllm import lora_request
    from talan_serve.prepared import prepare_model_dir
    from talan_serve.testing import build_tiny_checkpoint, build_tiny_model

    model = build_tiny_model("qwen3", work / "tiny-qwen3")
    checkpoint = work / "tiny-checkpoint"
    if not checkpoint.exists():
        build_tiny_checkpoint(model, checkpoint, lora=True)
    prepared = prepare_model_dir(checkpoint, work / "tiny-served", base_model_dir=model)
    lengths = [1, 5, 17, 33, 64, 100, 180, 300]
    prompts = [random_prompts(1, n, 500, seed=n)[0] for n in lengths]
    lora = lora_request(prepared)
    lora_options = dict(enable_lora=True, max_lora_rank=8, max_loras=1)
    report = {}
    for dtype in ("bfloat16", "float32"):
        try:
            report[dtype] = graphs_vs_eager(prepared, dtype, prompts, lora, lora_options)
        except Exception as err:  # record, keep the other dtype's result
            report[dtype] = dict(greedy_ids_equal=False, error=repr(err),
                                 traceback=traceback.format_exc()[-3000:])
            log(f"graphs {dtype} failed: {err!r}")
    history, mass_prompts, mode = report["bfloat16"].pop("_probe", ({}, [], None))
    fp32, bf16 = report["float32"], report["bfloat16"]
    # fp32: graphs must not change a single greedy token. bf16: graphs and eager kernels
    # round differently, with or without TALAN; TALAN must add no divergence of its own
    # (TALAN-on requests stay equal about as long as TALAN-off ones: docs/design.md, "Properties").
    bf16_ok = bf16["greedy_ids_equal"] or bf16.get("mean_on", 0) >= 0.9 * bf16.get("mean_off", 1)
    results["graphs"] = dict(ok=fp32["greedy_ids_equal"] and bf16_ok, prompt_lengths=lengths,
                             max_tokens=48, cudagraph_mode=mode, **report)

    expected_starts = {len(p) for p in mass_prompts}
    bad = []
    for request_id, masses in history.items():
        steps = [round(b - a, 4) for a, b in zip(masses, masses[1:], strict=False)]
        if round(masses[0]) not in expected_starts or any(abs(s - 1) > 1e-3 for s in steps):
            bad.append(dict(request=request_id, masses=masses))
    results["every_token"] = dict(
        ok=bool(history) and not bad and len(history) == len(mass_prompts),
        requests=len(history), decode_steps_checked=sum(len(m) - 1 for m in history.values()),
        failures=bad[:3], masses_first_request=next(iter(history.values()), []),
    )
    log(f"every_token: ok={results['every_token']['ok']} requests={len(history)}")


def check_throughput(work: Path, results: dict, out: Path, repeats: int,
                     shape: str = "q8b") -> None:
    import torch
    from vllm.lora.request import LoRARequest

    vllm_common.DETOKENIZE = False
    adapter = vllm_common.write_random_lora(work / f"{shape}-lora", shape_config(shape)[0],
                                            rank=16)
    lora = LoRARequest("bench-lora", 1, str(adapter))
    paths = {"talan": write_shape_model(work / f"{shape}-talan", True, shape),
             "host": write_shape_model(work / f"{shape}-host", False, shape)}
    modes = [
        Mode("talan+lora", "talan", True, True), Mode("talan-merged", "talan", True, False),
        Mode("talan-off+lora", "talan", False, True),
        Mode("lora-only", "host", True, True), Mode("base", "host", True, False),
    ]
    # Both engines up at once (0.40 of the GPU each), modes taking turns per repeat.
    engines = {name: engine(paths[name], eager=False, load_format="dummy",
                            skip_tokenizer_init=True, enable_lora=True, max_lora_rank=16,
                            max_loras=1, max_num_batched_tokens=8192)
               for name in ("talan", "host")}
    points = []
    for batch in (1, 8, 32):
        vocab = shape_config(shape)[0].vocab_size
        prompts = random_prompts(batch, 128, vocab, seed=batch)
        for point in measure_interleaved(engines, modes, prompts, 64, repeats, lora):
            log(f"{point.mode:15s} batch {batch:2d}: e2e {point.e2e_tok_s:9.1f} tok/s, "
                f"decode {point.decode_tok_s:9.1f} tok/s")
            points.append(point)
    engines.clear()
    release()
    title = ("Qwen3-8B shape (random weights), bf16, CUDA graphs, TALAN q8b preset"
             if shape == "q8b" else f"{shape} shape (smoke run)")
    meta = dict(title=title,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                vllm=__import__("vllm").__version__, prompt_len=128, decode_tokens=64,
                repeats=f"{repeats} runs per mode, ABBA order; slowdowns: medians of paired runs",
                lora="random rank-16 on q/k/v/o",
                note="talan-merged = TALAN engine without a LoRA request, the cost of "
                     "TALAN over a merged LoRA; base = host engine without a LoRA request")
    write_results(out / f"throughput_{shape}", meta, points, same_engine=False)
    rows = vllm_common.ratios(points, same_engine=False)
    results["throughput"] = dict(ok=True, ratios=rows)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/gpu_h200")
    parser.add_argument("--work-dir", default="/tmp/talan-gpu-check")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["graphs", "throughput"])
    parser.add_argument("--shape", default="q8b", choices=["q8b", "tiny"],
                        help="throughput model shape (tiny: a CPU smoke run of the script)")
    args = parser.parse_args()
    work, out = Path(args.work_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_env(work / "cache")
    import torch

    results: dict = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"),
                         gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    parts = [("graphs", lambda: check_graphs_and_every_token(work, results)),
             ("throughput", lambda: check_throughput(work, results, out, args.repeats,
                                                     args.shape))]
    for name, run in parts:
        if name in args.skip:
            continue
        try:
            run()
        except Exception as err:  # keep going: the other parts still report
            results.setdefault(name, {}).update(ok=False, error=repr(err),
                                                traceback=traceback.format_exc()[-4000:])
            log(f"{name} failed: {err!r}")
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok")]
    log(f"done; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
