"""Decoding one batch over many adapters against the same batch on one: what mixing costs.

One ``talan-serve --adapter-dir`` (vLLM; SGLang with ``--engine sglang``) on SmolLM2-135M
over ``--adapters`` copies of the demo checkpoint (other random weights), all loaded
(``--max-adapters`` as many), and ``--requests`` concurrent completions of
``--max-tokens`` each: all on one adapter, or spread over k of them (request i on adapter
i mod k). With TALAN on and off (``talan.enabled``: the LoRA alone), in ABBA order, each
adapter's requests warmed up first. No load happens while a batch decodes, so what this
shows is the engine's cost of a batch whose rows belong to different adapters, apart
from any loading (``bench_adapter_library.py`` measures the loads).

    python bench/bench_mixed_batch.py --out bench/results/mixed_batch_cpu_smollm2
    .venv-sglang/bin/python bench/bench_mixed_batch.py --engine sglang \\
        --out bench/results/mixed_batch_cpu_smollm2_sglang
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_adapter_library import DEMO, PROBE_DIR, build_library, prompt_of, start_server

logger = logging.getLogger("bench_mixed_batch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M)")
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--checkpoint", default=str(DEMO), help="the checkpoint copied")
    p.add_argument("--adapters", type=int, default=8, help="adapters loaded (the most k)")
    p.add_argument("--requests", type=int, default=8, help="requests decoding at once")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pairs", type=int, default=2, help="ABBA pairs per TALAN setting")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--out", default="bench/results/mixed_batch_cpu_smollm2")
    args = p.parse_args(argv)
    args.max_adapters, args.worker_cpus = args.adapters, None  # what start_server reads
    if args.model is None:
        from talan_serve.base_models import default_model_dir

        args.model = str(default_model_dir())
    return args


async def batch(url: str, models: list[str], tokens: int, talan: bool) -> float:
    """Completion tokens per second of one batch of concurrent requests."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:

        async def one(index: int, model: str) -> int:
            response = await client.post("/v1/completions", json={
                "model": model, "prompt": prompt_of(index), "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True, "talan": {"enabled": talan}})
            if response.status_code != 200:
                raise RuntimeError(f"{model}: {response.status_code} {response.text}")
            return response.json()["usage"]["completion_tokens"]

        started = time.monotonic()
        done = await asyncio.gather(*[one(i, m) for i, m in enumerate(models)])
        return sum(done) / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="talan-mixed-"))
    try:
        names = build_library(Path(args.checkpoint), work / "library", args.adapters,
                              work / PROBE_DIR, 0)
        server = start_server(args, work, work / "library", work / PROBE_DIR)
        mixed = [names[i % len(names)] for i in range(args.requests)]
        one = [names[0]] * args.requests
        rates: dict[str, list[float]] = {}
        try:
            asyncio.run(batch(server.base_url, mixed, 2, True))  # every adapter loaded
            for talan in (True, False):
                for is_mixed in (False, True, True, False) * args.pairs:
                    key = f"{'talan' if talan else 'lora'}_{'mixed' if is_mixed else 'one'}"
                    rate = asyncio.run(batch(server.base_url, mixed if is_mixed else one,
                                             args.max_tokens, talan))
                    logger.info("%s: %.1f tok/s", key, rate)
                    rates.setdefault(key, []).append(rate)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(Path(args.out), {"meta": meta_of(args, argv), "summary": summarize(rates),
                                   "rates": rates})
    return 0


def summarize(rates: dict[str, list[float]]) -> dict:
    """Medians, and the ratio of each ABBA pair's two mixed batches to its two on one
    adapter (each key's rates in the order run), with their median."""
    summary: dict = {key: statistics.median(values) for key, values in rates.items()}
    for part in ("talan", "lora"):
        one, mixed = rates[f"{part}_one"], rates[f"{part}_mixed"]
        pairs = [sum(mixed[i:i + 2]) / sum(one[i:i + 2]) for i in range(0, len(one), 2)]
        summary[f"{part}_ratios"] = pairs
        summary[f"{part}_ratio"] = statistics.median(pairs)
    return summary


def meta_of(args: argparse.Namespace, argv: list[str] | None) -> dict:
    return {
        "command": " ".join(["python", "bench/bench_mixed_batch.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "engine": f"{args.engine} (CPU), fp32, eager",
        "adapters": args.adapters, "requests": args.requests, "max_tokens": args.max_tokens,
    }


def write_results(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.parent.joinpath(f"{out.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    meta, s = record["meta"], record["summary"]
    lines = [f"# One batch over {meta['adapters']} adapters against one adapter", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "| the requests run | on one adapter | spread over the adapters | ratio |",
              "|---|---|---|---|"]
    for part, label in (("talan", "TALAN + LoRA"), ("lora", "LoRA alone (TALAN off)")):
        pairs = ", ".join(f"{r:.3f}" for r in s[f"{part}_ratios"])
        lines.append(f"| {label} | {s[f'{part}_one']:.1f} tok/s | {s[f'{part}_mixed']:.1f} "
                     f"tok/s | {s[f'{part}_ratio']:.3f}x (pairs {pairs}) |")
    lines += ["", f"Medians of {len(record['rates']['talan_one'])} batches each, in ABBA "
              "order; the ratio is the median of the pairs' (each pair's two batches of "
              "each kind). Every adapter was loaded before the first batch, so no batch "
              "waits for a load."]
    out.parent.joinpath(f"{out.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
