"""A bounded soak of a live server: many requests of random sizes, some abandoned midway.

Resident memory (the server process and every process under it: engine core, workers)
and the engine's unfinished-request count are read after a warm-up and again once the
server is idle; they must come back to where they started. Loopback only: it drives a
server this process starts. ``tests/server/test_soak.py`` runs a shorter one.

    python bench/soak_server.py --requests 5000 --output bench/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

WORDS = "the water call first who people side number sound apples sum total solve".split()


@dataclass
class SoakReport:
    requests: int = 0
    disconnects: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rss_mb_before: float = 0.0
    rss_mb_after: float = 0.0
    rss_mb_peak: float = 0.0
    unfinished_after: float | None = None
    running_after: float | None = None
    rss_mb_by_process_before: dict[str, float] = field(default_factory=dict)
    rss_mb_by_process_after: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def rss_by_process(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of ``pid`` and each of its descendants, by name and pid."""
    root = psutil.Process(pid)
    sizes = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name = "server" if process.pid == pid else process.name()
            sizes[f"{name}:{process.pid}"] = process.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return sizes


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MiB."""
    return sum(rss_by_process(pid).values())


async def _one(client: httpx.AsyncClient, rng: random.Random, report: SoakReport,
               disconnect_rate: float, max_tokens: int) -> None:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    body: dict = {"max_tokens": rng.randint(1, max_tokens), "stream": stream,
                  "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < 0.5}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    path = "/v1/chat/completions" if chat else "/v1/completions"
    leave = rng.random() < disconnect_rate
    status = "disconnected"
    try:
        if stream:
            async with client.stream("POST", path, json=body) as response:
                status = str(response.status_code)
                async for line in response.aiter_lines():
                    if leave and line.startswith("data: "):
                        status = "disconnected"
                        break
        else:
            timeout = rng.uniform(0.01, 0.2) if leave else 300
            response = await client.post(path, json=body, timeout=timeout)
            status = str(response.status_code)
    except httpx.TimeoutException:
        status = "disconnected"
    report.requests += 1
    report.disconnects += status == "disconnected"
    report.statuses[status] = report.statuses.get(status, 0) + 1


async def _drive(base_url: str, headers: dict, count: int, concurrency: int, seed: int,
                 disconnect_rate: float, max_tokens: int, deadline: float,
                 report: SoakReport, pid: int) -> None:
    rng = random.Random(seed)
    queue = iter(range(count))
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300,
                                 limits=limits) as client:
        async def worker() -> None:
            for _ in queue:
                if time.monotonic() > deadline:
                    return
                await _one(client, rng, report, disconnect_rate, max_tokens)
                if report.requests % 50 == 0:
                    report.rss_mb_peak = max(report.rss_mb_peak, rss_mb(pid))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def soak(server, count: int = 2000, concurrency: int = 16, seed: int = 0,
         disconnect_rate: float = 0.3, max_tokens: int = 32, max_seconds: float = 600,
         warmup: int = 100) -> SoakReport:
    """Run ``count`` requests (at most ``max_seconds``) against a ``server.local`` server;
    memory is measured after ``warmup`` requests and again once the server is idle."""
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    pid = server.process.pid
    scratch = SoakReport()
    asyncio.run(_drive(server.base_url, headers, warmup, concurrency, seed + 1,
                       disconnect_rate, max_tokens, time.monotonic() + max_seconds,
                       scratch, pid))
    wait_until_idle(server)
    before = rss_by_process(pid)
    report = SoakReport(rss_mb_before=sum(before.values()), rss_mb_by_process_before=before)
    start = time.monotonic()
    asyncio.run(_drive(server.base_url, headers, count, concurrency, seed, disconnect_rate,
                       max_tokens, start + max_seconds, report, pid))
    report.seconds = time.monotonic() - start
    wait_until_idle(server)
    report.rss_mb_by_process_after = rss_by_process(pid)
    report.rss_mb_after = sum(report.rss_mb_by_process_after.values())
    report.rss_mb_peak = max(report.rss_mb_peak, report.rss_mb_after)
    report.unfinished_after = server.metric("talan_serve_engine_unfinished_requests")
    report.running_after = server.metric("talan_serve_requests_running")
    return report


def wait_until_idle(server, timeout: float = 120) -> None:
    """Until no request runs in the server or the engine (raises after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("talan_serve_requests_running") == 0 and \
                server.metric("talan_serve_engine_unfinished_requests") == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("requests still running in the server or the engine")


def main(argv: list[str] | None = None) -> int:
    from server.local import start_local_server
    from talan_serve.testing import build_tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model (default: a tiny random Llama)")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--disconnect-rate", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=1200)
    p.add_argument("--kv-cache-mib", type=int, default=16,
                   help="the server's KV cache: small, so the warm-up touches it whole")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--output", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model = args.model or str(build_tiny_model("llama", work / "tiny-llama"))
    server = start_local_server(model, work, "--dtype", "float32", "--max-model-len", "512",
                                "--log-level", "warning", "--max-queued-requests", "64",
                                "--kv-cache-memory-bytes", str(args.kv_cache_mib * 2**20))
    try:
        report = soak(server, args.requests, args.concurrency,
                      disconnect_rate=args.disconnect_rate, max_tokens=args.max_tokens,
                      max_seconds=args.max_seconds, warmup=args.warmup)
    finally:
        server.stop()
    record = {"model": model, "concurrency": args.concurrency, **report.as_dict()}
    print(json.dumps(record, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
