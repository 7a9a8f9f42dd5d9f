"""Throughput of talan-serve's front end vs vLLM's own OpenAI server, same engine and model.

Both servers run the same vLLM engine (same model folder, dtype, context, eager mode);
only the HTTP front end differs. N concurrent clients each send streaming completions
(greedy, ``ignore_eos``, fixed length) for a fixed time; we count generated tokens per
second and report talan-serve / vLLM. Rounds alternate between the servers to spread
drift (other load, thermal) over both.

    python bench/bench_server.py                       # default model (SmolLM2-135M)
    python bench/bench_server.py --model DIR --concurrency 16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.local import LocalServer, start_on_free_port

NAME = "bench"


def server_command(kind: str, args: argparse.Namespace, port: int) -> list[str]:
    common = ["--port", str(port), "--dtype", args.dtype, "--max-model-len",
              str(args.max_model_len), "--served-model-name", NAME]
    if args.enforce_eager:
        common.append("--enforce-eager")
    if kind == "talan-serve":
        return [sys.executable, "-m", "server.cli", "--model", args.model,
                "--log-level", "warning", *common]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning", *common]


def start(kind: str, args: argparse.Namespace, log_dir: Path) -> LocalServer:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return start_on_free_port(lambda port: server_command(kind, args, port), log_dir, env,
                              timeout=args.start_timeout, log_name=kind)


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> int:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


async def load(url: str, args: argparse.Namespace, seconds: float) -> tuple[int, float, int]:
    """(generated tokens, elapsed seconds, requests) with ``concurrency`` busy clients."""
    prompts = [f"Client {i}: write a long story about the sea, the wind and ship number {i}."
               for i in range(args.concurrency)]
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        stop_at = time.monotonic() + seconds
        totals = [0, 0]

        async def worker(i: int) -> None:
            while time.monotonic() < stop_at:
                # Await first: `totals[0] += await ...` would read totals[0] before the
                # await and lose the other clients' updates.
                tokens = await one_request(client, prompts[i], args.max_tokens)
                totals[0] += tokens
                totals[1] += 1

        start = time.monotonic()
        await asyncio.gather(*[worker(i) for i in range(args.concurrency)])
        return totals[0], time.monotonic() - start, totals[1]


def measure(kind: str, args: argparse.Namespace, log_dir: Path) -> dict:
    server = start(kind, args, log_dir)
    try:
        asyncio.run(load(server.base_url, args, args.warmup))
        tokens, elapsed, requests = asyncio.run(load(server.base_url, args, args.duration))
    finally:
        server.stop()
    return {"server": kind, "tokens": tokens, "seconds": elapsed, "requests": requests,
            "tokens_per_s": tokens / elapsed}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--duration", type=float, default=40.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on without a GPU (CPU graph compilation takes minutes)")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.model is None:
        from talan_serve.base_models import default_model_dir

        args.model = str(default_model_dir())
    if args.enforce_eager is None:
        import torch

        args.enforce_eager = not torch.cuda.is_available()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-server-"))
    runs = []
    for round_index in range(args.rounds):
        order = ("talan-serve", "vllm") if round_index % 2 == 0 else ("vllm", "talan-serve")
        for kind in order:
            result = measure(kind, args, log_dir)
            runs.append(result)
            print(json.dumps(result), flush=True)
    ours = statistics.mean(r["tokens_per_s"] for r in runs if r["server"] == "talan-serve")
    theirs = statistics.mean(r["tokens_per_s"] for r in runs if r["server"] == "vllm")
    summary = {"model": args.model, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "talan_serve_tokens_per_s": ours,
               "vllm_tokens_per_s": theirs, "ratio": ours / theirs, "runs": runs,
               "logs": str(log_dir)}
    print(f"talan-serve {ours:.1f} tok/s, vLLM server {theirs:.1f} tok/s, "
          f"ratio {ours / theirs:.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
