"""Shared pieces of the vLLM engine benchmarks (CPU ``bench_vllm.py``, GPU ``gpu_check.py``).

Throughput is measured with ``LLM.generate`` on fixed random prompts (prefix caching off,
``ignore_eos``, greedy): end-to-end = generated tokens / wall time of the whole call;
decode = ``batch * (n - 1) / (t(n) - t(1))``, i.e. the steady decode steps alone. Each
point is the best of ``repeats`` runs (least disturbed by other load on the machine).
"""

from __future__ import annotations

import json
import os
import random
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
    e2e_tok_s: float
    decode_tok_s: float


# False when the engine runs without a tokenizer (random-weight GPU shapes).
DETOKENIZE = True


def _generate(llm, prompts, max_tokens: int, talan: bool, lora_request) -> float:
    from vllm import SamplingParams

    from talan_serve.engines.vllm import talan_extra_args

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=DETOKENIZE, extra_args=talan_extra_args(talan))
    inputs = [{"prompt_token_ids": p} for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, lora_request=lora_request, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return elapsed


def measure(llm, mode: Mode, prompts, decode_tokens: int, repeats: int, lora_request) -> Point:
    """One mode on one engine, ``repeats`` times back to back (see ``measure_interleaved``)."""
    return measure_interleaved({mode.engine: llm}, [mode], prompts, decode_tokens, repeats,
                               lora_request)[0]


def measure_interleaved(engines: dict, modes: list[Mode], prompts, decode_tokens: int,
                        repeats: int, lora_request) -> list[Point]:
    """Best-of-``repeats`` timings, the modes taking turns within each repeat.

    Taking turns spreads any background load over all modes alike, so the ratios stay
    meaningful on a shared machine.
    """
    def run(mode: Mode, max_tokens: int) -> float:
        lora = lora_request if mode.lora else None
        return _generate(engines[mode.engine], prompts, max_tokens, mode.talan, lora)

    for mode in modes:
        run(mode, 2)  # warm-up (LoRA load, graph shapes)
    full = {m.name: float("inf") for m in modes}
    first = dict(full)
    for _ in range(repeats):
        for mode in modes:
            full[mode.name] = min(full[mode.name], run(mode, decode_tokens))
            first[mode.name] = min(first[mode.name], run(mode, 1))
    batch = len(prompts)
    return [Point(
        mode=m.name, batch=batch, prompt_len=len(prompts[0]), decode_tokens=decode_tokens,
        e2e_seconds=full[m.name], prefill_seconds=first[m.name],
        e2e_tok_s=batch * decode_tokens / full[m.name],
        decode_tok_s=batch * (decode_tokens - 1) / max(full[m.name] - first[m.name], 1e-9),
    ) for m in modes]


RATIOS = (
    # (label, numerator mode, denominator mode): time ratio = baseline tok/s / mode tok/s
    ("TALAN+LoRA vs LoRA-only", "talan+lora", "lora-only"),
    ("TALAN+LoRA vs base", "talan+lora", "base"),
    ("LoRA-only vs base", "lora-only", "base"),
    ("TALAN (merged LoRA) vs base", "talan-merged", "base"),
    ("TALAN-off+LoRA vs LoRA-only", "talan-off+lora", "lora-only"),
)


def ratios(points: list[Point]) -> list[dict[str, Any]]:
    """Slowdown factors (>1: slower than the baseline), per batch, e2e and decode."""
    table = {(p.mode, p.batch): p for p in points}
    rows = []
    for label, mode, baseline in RATIOS:
        for batch in sorted({p.batch for p in points}):
            if (mode, batch) not in table or (baseline, batch) not in table:
                continue
            a, b = table[(mode, batch)], table[(baseline, batch)]
            rows.append(dict(comparison=label, batch=batch,
                             e2e_slowdown=b.e2e_tok_s / a.e2e_tok_s,
                             decode_slowdown=b.decode_tok_s / a.decode_tok_s))
    return rows


def write_results(out: Path, meta: dict[str, Any], points: list[Point]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = ratios(points)
    record = dict(meta=meta, points=[asdict(p) for p in points], ratios=rows)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# vLLM engine benchmark: {meta.get('title', '')}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "title"]
    lines += ["", "| mode | batch | e2e tok/s | decode tok/s | e2e s | prefill s |",
              "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.mode} | {p.batch} | {p.e2e_tok_s:.1f} | {p.decode_tok_s:.1f} | "
                     f"{p.e2e_seconds:.3f} | {p.prefill_seconds:.3f} |")
    lines += ["", "Slowdown (baseline throughput / mode throughput; 1.00 = no overhead):", "",
              "| comparison | batch | end-to-end | decode |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['comparison']} | {r['batch']} | {r['e2e_slowdown']:.3f}x | "
                     f"{r['decode_slowdown']:.3f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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
