"""Shared pieces of the vLLM engine benchmarks (CPU ``bench_vllm.py``, GPU ``gpu_check.py``).

Each run submits a batch of fixed random prompts (prefix caching off, ``ignore_eos``,
greedy) to the engine and drives ``LLMEngine.step`` itself, timing every step:

* end-to-end = generated tokens / wall time of the whole run (best of ``repeats``);
* decode = batch / the median time of a decode step (every step after the first, which
  is the prefill), pooled over all repeats. A median over hundreds of steps shrugs off
  the bursts of other load that made whole-run timings on this 2-core host swing by
  10-20% (the old ``t(n) - t(1)`` estimate).

Slowdown ratios pair runs instead: run r of a mode against run r of its baseline, the
modes taking turns in ABBA order (reversed every other repeat), and the reported
slowdowns are the medians of those paired ratios (of whole-run wall times for
end-to-end, of the runs' median decode steps for decode). The host's speed drifts by up to 20%
over minutes; neighbouring runs see nearly the same host, and ABBA cancels a steady
drift, where a ratio of pooled medians would carry the drift between repeats.
"""


from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: fast start, probes work
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # CPU only: KV cache GiB (skips a memory check)
}


def set_env(cache_dir: Path | None = None) -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if cache_dir is not None:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(count)]


@dataclass
class Mode:
    """One way of serving a request: which engine, TALAN on/off, LoRA or not."""

    name: str
    engine: str
    talan: bool
    lora: bool


@dataclass
class Point:
    mode: str
    batch: int
    prompt_len: int
    decode_tokens: int
    e2e_seconds: float
    prefill_seconds: float
    decode_step_ms: float
    e2e_tok_s: float
    decode_tok_s: float
    # Each run's wall time and median decode step, in run order (the modes take turns).
    e2e_seconds_runs: list[float]
    decode_step_ms_runs: list[float]


# False when the engine runs without a tokenizer (random-weight GPU shapes).
DETOKENIZE = True


def _run(llm, prompts, max_tokens: int, talan: bool, lora_request,
         routes: list[tuple[dict, Any]] | None = None) -> tuple[float, list[float]]:
    """One batch through the engine: total wall time and the time of each step.

    ``routes``: each prompt's own (switch arguments, LoRA request), overriding ``talan``
    and ``lora_request`` (a server of many adapters)."""
    from vllm import SamplingParams

    from talan_serve.switch import switch_args

    if routes is None:
        routes = [(switch_args(talan), lora_request)] * len(prompts)
    engine = llm.llm_engine
    start = time.perf_counter()
    for prompt, (switch, lora) in zip(prompts, routes, strict=True):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=DETOKENIZE, extra_args=switch)
        engine.add_request(f"bench-{next(_REQUEST_IDS)}", {"prompt_token_ids": prompt}, params,
                           lora_request=lora)
    steps, lengths = [], []
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - step_start)
        lengths += [len(o.outputs[0].token_ids) for o in outputs if o.finished]
    elapsed = time.perf_counter() - start
    assert lengths == [max_tokens] * len(prompts), lengths
    return elapsed, steps


_REQUEST_IDS = itertools.count()


def measure(llm, mode: Mode, prompts, decode_tokens: int, repeats: int, lora_request) -> Point:
    """One mode on one engine, ``repeats`` times back to back (see ``measure_interleaved``)."""
    return measure_interleaved({mode.engine: llm}, [mode], prompts, decode_tokens, repeats,
                               lora_request)[0]


def measure_interleaved(engines: dict, modes: list[Mode], prompts, decode_tokens: int,
                        repeats: int, lora_request,
                        routes: dict[str, list[tuple[dict, Any]]] | None = None) -> list[Point]:
    """Timings of each mode, the modes taking turns within each repeat.

    Taking turns spreads any background load over all modes alike, so the ratios stay
    meaningful on a shared machine. ``routes``: per-prompt routes of a mode (``_run``).
    """
    def run(mode: Mode, max_tokens: int) -> tuple[float, list[float]]:
        lora = lora_request if mode.lora else None
        return _run(engines[mode.engine], prompts, max_tokens, mode.talan, lora,
                    (routes or {}).get(mode.name))

    for mode in modes:
        run(mode, 2)  # warm-up (LoRA load, graph shapes)
    e2e = {m.name: float("inf") for m in modes}
    prefill = dict(e2e)
    decode_steps: dict[str, list[float]] = {m.name: [] for m in modes}
    run_steps: dict[str, list[float]] = {m.name: [] for m in modes}
    run_seconds: dict[str, list[float]] = {m.name: [] for m in modes}
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            elapsed, steps = run(mode, decode_tokens)
            e2e[mode.name] = min(e2e[mode.name], elapsed)
            prefill[mode.name] = min(prefill[mode.name], steps[0])
            decode_steps[mode.name] += steps[1:]
            run_steps[mode.name].append(statistics.median(steps[1:]) * 1e3)
            run_seconds[mode.name].append(elapsed)
    batch = len(prompts)
    points = []
    for m in modes:
        step = statistics.median(decode_steps[m.name])
        points.append(Point(
            mode=m.name, batch=batch, prompt_len=len(prompts[0]), decode_tokens=decode_tokens,
            e2e_seconds=e2e[m.name], prefill_seconds=prefill[m.name],
            decode_step_ms=step * 1e3, e2e_tok_s=batch * decode_tokens / e2e[m.name],
            decode_tok_s=batch / step, e2e_seconds_runs=run_seconds[m.name],
            decode_step_ms_runs=run_steps[m.name],
        ))
    return points


RATIOS = (
    # (label, mode, baseline mode): slowdown = baseline tok/s / mode tok/s
    ("TALAN+LoRA vs LoRA-only, host engine", "talan+lora", "lora-only"),
    ("TALAN (merged LoRA) vs base, host engine", "talan-merged", "base"),
    ("TALAN (merged LoRA) vs LoRA-only, host engine", "talan-merged", "lora-only"),
    ("LoRA-only vs base, host engines", "lora-only", "base"),
    ("LoRA-only: TALAN engine (off) vs host engine", "talan-off+lora", "lora-only"),
)
# Baselines on the TALAN engine instance itself: every request TALAN-off, which skips the
# side path. Only where that skip happens (eager or piecewise steps); a full CUDA graph
# replays the side path whatever the flags, so GPU runs leave these out.
SAME_ENGINE_RATIOS = (
    ("TALAN+LoRA vs LoRA-only, same engine (TALAN off)", "talan+lora", "talan-off+lora"),
    ("TALAN (merged LoRA) vs base, same engine (TALAN off)", "talan-merged",
     "talan-merged-off"),
)


def ratios(points: list[Point], same_engine: bool = True,
           comparisons: tuple[tuple[str, str, str], ...] | None = None) -> list[dict[str, Any]]:
    """Slowdown factors (>1: slower than the baseline), per batch, e2e and decode;
    ``comparisons``: (label, mode, baseline) rows instead of the TALAN/LoRA ones."""
    table = {(p.mode, p.batch): p for p in points}
    rows = []
    if comparisons is None:
        comparisons = (SAME_ENGINE_RATIOS if same_engine else ()) + RATIOS
    for label, mode, baseline in comparisons:
        for batch in sorted({p.batch for p in points}):
            if (mode, batch) not in table or (baseline, batch) not in table:
                continue
            a, b = table[(mode, batch)], table[(baseline, batch)]
            # Run r of the mode against run r of its baseline: neighbours in time.
            e2e = [x / y for x, y in zip(a.e2e_seconds_runs, b.e2e_seconds_runs, strict=True)]
            decode = [x / y for x, y in
                      zip(a.decode_step_ms_runs, b.decode_step_ms_runs, strict=True)]
            rows.append(dict(comparison=label, batch=batch,
                             e2e_slowdown=statistics.median(e2e), e2e_slowdown_runs=e2e,
                             decode_slowdown=statistics.median(decode),
                             decode_slowdown_runs=decode))
    return rows


def write_results(out: Path, meta: dict[str, Any], points: list[Point],
                  same_engine: bool = True,
                  comparisons: tuple[tuple[str, str, str], ...] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = ratios(points, same_engine, comparisons)
    record = dict(meta=meta, points=[asdict(p) for p in points], ratios=rows)
    # Not with_suffix: a name like vllm_cpu_qwen3-0.6b already has a "suffix" (.6b).
    out.parent.joinpath(f"{out.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# vLLM engine benchmark: {meta.get('title', '')}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "title"]
    lines += ["", "| mode | batch | e2e tok/s | decode tok/s | decode step ms | e2e s "
              "| prefill s |", "|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.mode} | {p.batch} | {p.e2e_tok_s:.1f} | {p.decode_tok_s:.1f} | "
                     f"{p.decode_step_ms:.2f} | {p.e2e_seconds:.3f} | {p.prefill_seconds:.3f} |")
    lines += ["", "Slowdown (mode time / baseline time; 1.00 = no overhead): the median over "
              "repeats of a run against its baseline's run in the same repeat, of the "
              "whole run's wall time (end-to-end) and of its median decode step (decode); "
              "runs: the lowest and highest of those paired ratios.", "",
              "| comparison | batch | end-to-end | e2e runs | decode | decode runs |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['comparison']} | {r['batch']} | {r['e2e_slowdown']:.3f}x | "
                     f"{_spread(r['e2e_slowdown_runs'])} | {r['decode_slowdown']:.3f}x | "
                     f"{_spread(r['decode_slowdown_runs'])} |")
    out.parent.joinpath(f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if values else "-"


def write_random_lora(out: Path, hf_config: Any, rank: int = 16, seed: int = 0) -> Path:
    """A PEFT LoRA adapter (q/k/v/o of every layer) with random weights, no model needed."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    d = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or d // hf_config.num_attention_heads
    q_out = hf_config.num_attention_heads * head_dim
    kv_out = hf_config.num_key_value_heads * head_dim
    shapes = {"q_proj": (d, q_out), "k_proj": (d, kv_out), "v_proj": (d, kv_out),
              "o_proj": (q_out, d)}
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
        lora_dropout=0.0, bias="none", target_modules=list(shapes),
        base_model_name_or_path="random", use_dora=False, fan_in_fan_out=False,
        modules_to_save=None, use_rslora=False,
    ), indent=2) + "\n")
    return out


# Host shapes for random-weight runs (``load_format="dummy"``): name -> (paper preset whose
# TALAN config is used, host config overrides). q8b is the paper's Qwen3-8B host; the
# 0.6B shape (Qwen3-0.6B's dimensions) fits two engines in this CPU host's memory.
SHAPES = {
    "q8b": ("q8b", {}),
    "qwen3-0.6b": ("q8b", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                               tie_word_embeddings=True)),
}


def shape_config(shape: str):
    """(host config, TALAN config) for a named shape, or ``tiny`` (smoke runs)."""
    from dataclasses import replace

    from talan_serve.presets import host_config, preset

    if shape == "tiny":
        from talan_serve.testing import tiny_host_config, tiny_talan_config

        return tiny_host_config("qwen3", 512), tiny_talan_config()
    preset_name, overrides = SHAPES[shape]
    config = host_config(preset_name)
    for key, value in overrides.items():
        setattr(config, key, value)
    if overrides.get("num_hidden_layers") and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
        config.max_window_layers = config.num_hidden_layers
    return config, replace(preset(preset_name), hidden_size=config.hidden_size)


def write_shape_model(out: Path, talan: bool, shape: str = "q8b") -> Path:
    """Host config (random weights via load_format=dummy), optionally with TALAN."""
    from talan_serve.prepared import talan_model_config

    config, talan_config = shape_config(shape)
    record = config.to_dict()
    record["architectures"] = ["Qwen3ForCausalLM"]
    record["dtype"] = "bfloat16"
    record["max_position_embeddings"] = 4096
    if talan:
        record = talan_model_config(record, talan_config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
