"""A library of TALAN+LoRA adapters served on demand: 100 on disk, 8 places, Zipf traffic.

One ``talan-serve`` (vLLM; SGLang with ``--engine sglang``) on SmolLM2-135M with
``--adapter-dir`` holding ``--adapters`` copies of the demo checkpoint, each with other
random weights of the same shapes (``talan_serve.testing.reweight_checkpoint``), and
``--max-adapters 8``. It measures,
through the HTTP server:

* throughput: ``--requests`` completions from ``--clients`` concurrent clients, each
  request's adapter drawn from Zipf(``--zipf``) over the library, against the same
  requests all sent to one adapter (the most popular), in ABBA order on the same server;
* load latency from disk (read and validated) and from the host cache (an evicted
  adapter coming back), p50 and p95, from the server's own log of each load: on an idle
  engine (``--max-adapters`` + 2 adapters asked for one at a time, twice, before the
  traffic) and under the traffic;
* the decode step while a load runs: ``--streams`` streaming requests on one resident
  adapter, the gaps between their tokens, while adapters of another folder are loaded
  and unloaded back to back (``/v1/load_lora_adapter``, read from disk each time),
  against the same streams with no load, in ABBA order; and the decode time lost per
  load (the streams' extra time over the loads they overlapped), which, unlike the
  ratio, does not grow with how many loads fit in the probe; and the same ratio from
  ``--window-runs`` runs in which the loader alternates windows of loads and of none, so
  that both sides share the run's conditions;
* the CPU a load costs each of the server's processes (front end, engine core, workers:
  their user + system time over ``--cpu-cycles`` loads and unloads on an idle engine).

The adapters live in a temporary folder (about 4 MB each) that is deleted at the end.
``--worker-cpus`` binds the engine's worker to some cores, leaving the others to the rest
of the server (by default it decodes on every core of a small machine).

    python bench/bench_adapter_library.py --out bench/results/adapter_library_cpu_smollm2
    .venv-sglang/bin/python bench/bench_adapter_library.py --engine sglang \
        --out bench/results/adapter_library_cpu_smollm2_sglang
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "checkpoints" / "smollm2-talan-demo"
NAME = "base"
PROBE_DIR = "probes"  # adapters loaded during the decode-step probe, outside the library
# vLLM's engine core and workers, SGLang's scheduler and detokenizer (process names).
PROCESS_ROLES = (("EngineCor", "engine core"), ("Worker", "workers"),
                 ("schedul", "scheduler"), ("detoken", "detokenizer"))
LOAD_LINE = re.compile(r"adapter (\S+) loaded from (disk|cache) in ([0-9.]+) s")

logger = logging.getLogger("bench_adapter_library")


@dataclass(frozen=True)
class Run:
    """One pass of the traffic: which mode, how long, how many tokens came back."""

    mode: str
    seconds: float
    tokens: int
    requests: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M)")
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm",
                   help="sglang: run in SGLang's environment (on CPU with the test suite's "
                        "stand-in for its kernel library, as bench_sglang.py)")
    p.add_argument("--checkpoint", default=str(DEMO), help="the checkpoint copied")
    p.add_argument("--adapters", type=int, default=100, help="adapters in the library")
    p.add_argument("--max-adapters", type=int, default=8)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=192, help="requests per traffic pass")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--pairs", type=int, default=2, help="ABBA pairs of traffic passes")
    p.add_argument("--streams", type=int, default=4, help="streams of the decode probe")
    p.add_argument("--stream-tokens", type=int, default=96)
    p.add_argument("--probe-pairs", type=int, default=2, help="ABBA pairs of the probe")
    p.add_argument("--window-runs", type=int, default=2,
                   help="runs of the probe with loading and quiet windows interleaved")
    p.add_argument("--probe-window", type=float, default=1.0,
                   help="seconds of each window of those runs")
    p.add_argument("--cpu-cycles", type=int, default=20,
                   help="loads and unloads timed for their CPU on an idle engine")
    p.add_argument("--worker-cpus", default=None,
                   help="the engine worker's CPUs (VLLM_CPU_OMP_THREADS_BIND, e.g. 0: the "
                        "other cores left to the front end and engine core); default: the "
                        "server's choice (every core on a machine of up to 4)")
    p.add_argument("--work-dir", default=None, help="default: a new temporary folder")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--out", default="bench/results/adapter_library_cpu_smollm2")
    args = p.parse_args(argv)
    if args.engine == "sglang" and args.worker_cpus is not None:
        p.error("--worker-cpus binds vLLM's workers")
    if args.model is None:
        from talan_serve.base_models import default_model_dir

        args.model = str(default_model_dir())
    return args


def build_library(source: Path, library: Path, count: int, probes: Path, probe_count: int
                  ) -> list[str]:
    """``count`` copies of ``source`` with other random weights in ``library``, and
    ``probe_count`` more in ``probes``; the library's names, most popular first."""
    from talan_serve.testing import reweight_checkpoint

    names = [f"a{index:03d}" for index in range(count)]
    for index, name in enumerate(tqdm(names, desc="library", unit="adapter")):
        reweight_checkpoint(source, library / name, seed=1000 + index)
    for index in range(probe_count):
        reweight_checkpoint(source, probes / f"p{index}", seed=5000 + index)
    return names


def zipf_traffic(names: list[str], requests: int, exponent: float, seed: int = 0
                 ) -> list[str]:
    """Each request's adapter: rank k (1-based) drawn with probability ~ 1 / k**exponent."""
    weights = [1 / (rank ** exponent) for rank in range(1, len(names) + 1)]
    return random.Random(seed).choices(names, weights=weights, k=requests)


def start_server(args: argparse.Namespace, work: Path, library: Path, probes: Path):
    from server.local import start_local_server
    from talan_serve.base_models import cache_root

    # The user's model cache (not one under the work folder: no second preparation), and
    # room in the KV cache for 32 clients.
    env = {"TALAN_SERVE_CACHE": str(cache_root()),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if args.worker_cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.worker_cpus
    if args.engine == "sglang":
        from bench_sglang import engine_env

        stand_in = engine_env()  # empty on a GPU
        if stand_in:  # the CPU stand-in for SGLang's kernels: LoRAs without pinned memory
            env.update(stand_in, TALAN_TEST_NO_PIN="1")
    return start_local_server(
        args.model, work, "--engine", args.engine, "--served-model-name", NAME,
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--log-level", "info",
        "--adapter-dir", str(library), "--max-adapters", str(args.max_adapters),
        "--max-lora-rank", "8", "--allowed-adapter-dirs", str(probes),
        timeout=args.start_timeout, env=env)


def prompt_of(index: int) -> str:
    return f"Request {index}: tell a short story about the sea and ship number {index}."


async def traffic(url: str, models: list[str], clients: int, max_tokens: int, mode: str
                  ) -> Run:
    """Every request of ``models`` (one each, in order) through ``clients`` workers."""
    queue = list(enumerate(models))
    tokens = [0]
    limits = httpx.Limits(max_connections=clients * 2)
    progress = tqdm(total=len(models), desc=mode, unit="req", leave=False)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:

        async def worker() -> None:
            while queue:
                index, model = queue.pop(0)
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": prompt_of(index), "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True})
                if response.status_code != 200:
                    raise RuntimeError(f"{model}: {response.status_code} {response.text}")
                got = response.json()["usage"]["completion_tokens"]
                tokens[0] += got
                progress.update()

        started = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(clients)])
        seconds = time.monotonic() - started
    progress.close()
    return Run(mode, seconds, tokens[0], len(models))


async def stream_stamps(client: httpx.AsyncClient, model: str, index: int, tokens: int
                        ) -> list[float]:
    """When each token of one streamed completion arrived (``time.monotonic``)."""
    body = {"model": model, "prompt": prompt_of(index), "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    stamps: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
    return stamps


def decode_gaps(stamps: list[float]) -> list[tuple[float, float]]:
    """(start, end) of each gap between consecutive tokens after the first (the first
    token's wait is the prefill's)."""
    return list(zip(stamps[1:], stamps[2:], strict=False))


def gaps_by_window(streams: list[list[float]], windows: list[tuple[float, float, bool]]
                   ) -> dict[bool, list[float]]:
    """Each stream's gaps between tokens (``decode_gaps``) under the kind of window
    (start, end, loading) that holds it whole; a gap across a window's edge counts for
    neither."""
    gaps: dict[bool, list[float]] = {True: [], False: []}
    for stream in streams:
        for a, b in decode_gaps(stream):
            window = next((w for w in windows if w[0] <= a and b <= w[1]), None)
            if window is not None:
                gaps[window[2]].append(b - a)
    return gaps


async def load_cycle(client: httpx.AsyncClient, folders: list[Path], index: int,
                     loads: list[float]) -> None:
    """Load probe adapter ``index`` of ``folders`` (from disk) and unload it; ``loads``
    gets the load's seconds."""
    started = time.monotonic()
    response = await client.post("/v1/load_lora_adapter", json={
        "lora_name": "probe", "lora_path": str(folders[index % len(folders)])})
    if response.status_code != 200:
        raise RuntimeError(f"load: {response.status_code} {response.text}")
    loads.append(time.monotonic() - started)
    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "probe"})
    if response.status_code != 200:
        raise RuntimeError(f"unload: {response.status_code} {response.text}")


async def probe(url: str, model: str, args: argparse.Namespace, probes: Path, loading: bool
                ) -> dict:
    """The decode probe's streams, with adapters loaded and unloaded meanwhile or not."""
    loads: list[float] = []
    folders = sorted(probes.iterdir())
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        done = asyncio.Event()

        async def loader() -> None:
            index = 0
            while not done.is_set():
                await load_cycle(client, folders, index, loads)
                index += 1

        task = asyncio.create_task(loader()) if loading else None
        started = time.monotonic()
        stamps = await asyncio.gather(*[stream_stamps(client, model, i, args.stream_tokens)
                                        for i in range(args.streams)])
        seconds = time.monotonic() - started
        done.set()
        if task is not None:
            await task
    gaps = [[b - a for a, b in decode_gaps(stream)] for stream in stamps]
    pooled = [gap for stream in gaps for gap in stream]
    return {"loading": loading, "median_gap_ms": 1000 * statistics.median(pooled),
            "mean_gap_ms": 1000 * statistics.fmean(pooled), "gaps": len(pooled),
            "gaps_per_stream": len(gaps[0]), "seconds": seconds, "loads": len(loads)}


async def probe_windows(url: str, model: str, args: argparse.Namespace, probes: Path
                        ) -> dict:
    """The probe's streams once, while the loader alternates windows of
    ``--probe-window`` seconds: loads back to back, then none. A gap between tokens
    counts for the window that holds it whole (gaps across a window's edge are left
    out), so both kinds share one run's conditions: a slow minute of a shared machine
    slows both alike."""
    loads: list[float] = []
    folders = sorted(probes.iterdir())
    windows: list[tuple[float, float, bool]] = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        done = asyncio.Event()

        async def loader() -> None:
            index, loading = 0, False
            while not done.is_set():
                started = time.monotonic()
                if loading:
                    while not done.is_set() and time.monotonic() - started < args.probe_window:
                        await load_cycle(client, folders, index, loads)
                        index += 1
                else:
                    try:
                        await asyncio.wait_for(done.wait(), args.probe_window)
                    except TimeoutError:
                        pass
                windows.append((started, time.monotonic(), loading))
                loading = not loading

        task = asyncio.create_task(loader())
        stamps = await asyncio.gather(*[stream_stamps(client, model, i, args.stream_tokens)
                                        for i in range(args.streams)])
        done.set()
        await task
    gaps = gaps_by_window(stamps, windows)
    return {"median_gap_loading_ms": 1000 * statistics.median(gaps[True]),
            "median_gap_no_load_ms": 1000 * statistics.median(gaps[False]),
            "gaps_loading": len(gaps[True]), "gaps_no_load": len(gaps[False]),
            "windows": len(windows), "loads": len(loads),
            "gap_ms": {"loading": [1000 * g for g in gaps[True]],
                       "no_load": [1000 * g for g in gaps[False]]}}


def interleaved_summary(runs: list[dict]) -> dict:
    """The interleaved probe's ratio over all its runs' gaps, and each run's."""
    loading = [g for r in runs for g in r["gap_ms"]["loading"]]
    quiet = [g for r in runs for g in r["gap_ms"]["no_load"]]
    return {"decode_gap_loading_interleaved_ms": statistics.median(loading),
            "decode_gap_no_load_interleaved_ms": statistics.median(quiet),
            "decode_step_ratio_interleaved": statistics.median(loading)
            / statistics.median(quiet),
            "decode_step_ratios_interleaved": [
                r["median_gap_loading_ms"] / r["median_gap_no_load_ms"] for r in runs]}


def decode_lost_per_load(runs: list[dict]) -> float:
    """Milliseconds of decoding lost per load: the loading runs' streams took
    (gaps per stream) x (mean gap loading - mean gap with no load) longer, over their
    loads."""
    quiet = statistics.fmean(r["mean_gap_ms"] for r in runs if not r["loading"])
    busy = [r for r in runs if r["loading"]]
    lost = sum(r["gaps_per_stream"] * (r["mean_gap_ms"] - quiet) for r in busy)
    return lost / max(1, sum(r["loads"] for r in busy))


def process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in process_tree(int(child)))]


def cpu_ms(pids: list[int]) -> dict[str, float]:
    """User + system CPU milliseconds so far, by role: the server's front end (its first
    process), the engine's processes (by their names: ``PROCESS_ROLES``)."""
    roles: dict[str, float] = {}
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        role = "front end" if pid == pids[0] else next(
            (role for part, role in PROCESS_ROLES if part in name), "other")
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) * tick
    return roles


def load_cpu(url: str, pid: int, probes: Path, cycles: int) -> dict[str, float]:
    """CPU milliseconds per load + unload (``/v1/load_lora_adapter``, from disk) on an
    idle engine, by process role."""
    pids = process_tree(pid)
    with httpx.Client(base_url=url, timeout=300) as client:
        folders = sorted(probes.iterdir())
        before = cpu_ms(pids)
        for index in range(cycles):
            for path, body in (("/v1/load_lora_adapter", {
                    "lora_name": "cpu", "lora_path": str(folders[index % len(folders)])}),
                    ("/v1/unload_lora_adapter", {"lora_name": "cpu"})):
                response = client.post(path, json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text}")
        after = cpu_ms(pids)
    spent = {role: (after[role] - before.get(role, 0.0)) / cycles for role in after}
    return {role: ms for role, ms in spent.items() if ms > 0}


def idle_loads(url: str, names: list[str], rounds: int = 2) -> None:
    """Each of ``names`` asked for one token, one request at a time, ``rounds`` times:
    with more names than places, each is loaded (from disk, then from the cache) while
    the engine has nothing else to do."""
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(rounds):
            for name in names:
                response = client.post("/v1/completions", json={
                    "model": name, "prompt": prompt_of(0), "max_tokens": 1})
                if response.status_code != 200:
                    raise RuntimeError(f"{name}: {response.status_code} {response.text}")


def loads_in_log(text: str) -> dict[str, list[float]]:
    """Seconds of each load the server logged: the library's on-demand loads by source,
    and the probe's (from disk, while its streams run)."""
    found: dict[str, list[float]] = {"disk": [], "cache": [], "probe": []}
    for match in LOAD_LINE.finditer(text):
        found["probe" if match[1] == "probe" else match[2]].append(float(match[3]))
    return found


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"count": len(values), "p50_ms": 1000 * at(0.50), "p95_ms": 1000 * at(0.95)}


def abba(pairs: int) -> list[bool]:
    """True: the library pass; ABBA, reversed every other pair."""
    return [first for pair in range(pairs)
            for first in ((True, False) if pair % 2 == 0 else (False, True))]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="talan-lib-"))
    library, probes = work / "library", work / PROBE_DIR
    try:
        names = build_library(Path(args.checkpoint), library, args.adapters, probes, 4)
        models = zipf_traffic(names, args.requests, args.zipf)
        popular = names[0]
        logger.info("%d requests over %d distinct adapters; %s has %d of them",
                    len(models), len(set(models)), popular, models.count(popular))
        server = start_server(args, work, library, probes)
        url, log = server.base_url, server.log
        try:
            idle_names = names[-(args.max_adapters + 2):]  # the tail: rare in the traffic
            logger.info("idle loads: %s, one request at a time, twice", ", ".join(idle_names))
            idle_loads(url, idle_names)
            idle_end = len(log.read_text())
            cpu = load_cpu(url, server.process.pid, probes, args.cpu_cycles)
            logger.info("CPU per load and unload, idle engine: %s", ", ".join(
                f"{role} {ms:.1f} ms" for role, ms in cpu.items()))
            cpu_end = len(log.read_text())
            logger.info("warm-up: the traffic once (loads every adapter it names from disk)")
            warm = asyncio.run(traffic(url, models, args.clients, args.max_tokens, "warm-up"))
            runs: list[Run] = []
            for is_library in abba(args.pairs):
                mode = "library" if is_library else "one adapter"
                sent = models if is_library else [popular] * len(models)
                run = asyncio.run(traffic(url, sent, args.clients, args.max_tokens, mode))
                logger.info("%s: %.1f tok/s (%.1f s)", mode, run.tokens_per_s, run.seconds)
                runs.append(run)
            pairs = [(a, b) if a.mode == "library" else (b, a)
                     for a, b in zip(runs[::2], runs[1::2], strict=True)]
            ratios = [lib.tokens_per_s / one.tokens_per_s for lib, one in pairs]
            probe_runs = []
            for loading in (False, True, True, False) * (args.probe_pairs // 2) + (
                    (False, True) if args.probe_pairs % 2 else ()):
                result = asyncio.run(probe(url, popular, args, probes, loading))
                logger.info("decode probe, %s: median gap %.1f ms, %d loads",
                            "loading" if loading else "no load", result["median_gap_ms"],
                            result["loads"])
                probe_runs.append(result)
            window_runs = []
            for _ in range(args.window_runs):
                result = asyncio.run(probe_windows(url, popular, args, probes))
                logger.info("decode probe, interleaved windows: median gap %.1f ms loading, "
                            "%.1f ms not, %d loads", result["median_gap_loading_ms"],
                            result["median_gap_no_load_ms"], result["loads"])
                window_runs.append(result)
            with httpx.Client(base_url=url) as client:
                metrics = client.get("/metrics").text
        finally:
            server.stop()
        text = log.read_text()
        idle, loads = loads_in_log(text[:idle_end]), loads_in_log(text[cpu_end:])
        quiet = [r["median_gap_ms"] for r in probe_runs if not r["loading"]]
        busy = [r["median_gap_ms"] for r in probe_runs if r["loading"]]
        evictions = re.search(r"^talan_serve_adapter_evictions_total (\S+)$", metrics, re.M)
        summary = {
            "throughput_ratio_median": statistics.median(ratios),
            "throughput_ratios": ratios,
            "library_tokens_per_s": statistics.median(
                r.tokens_per_s for r in runs if r.mode == "library"),
            "one_adapter_tokens_per_s": statistics.median(
                r.tokens_per_s for r in runs if r.mode != "library"),
            "idle_load_from_disk": percentiles(idle["disk"]),
            "idle_load_from_cache": percentiles(idle["cache"]),
            "load_from_disk": percentiles(loads["disk"]),
            "load_from_cache": percentiles(loads["cache"]),
            "probe_load_from_disk": percentiles(loads["probe"]),
            "decode_gap_no_load_ms": statistics.median(quiet),
            "decode_gap_loading_ms": statistics.median(busy),
            "decode_step_ratio": statistics.median(busy) / statistics.median(quiet),
            "decode_lost_per_load_ms": decode_lost_per_load(probe_runs),
            **interleaved_summary(window_runs),
            "cpu_ms_per_load_and_unload": cpu,
            "evictions": float(evictions[1]) if evictions else None,
        }
        meta = {
            "command": " ".join(["python", "bench/bench_adapter_library.py", *(argv or
                                                                              sys.argv[1:])]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.python_version()}",
            "engine": f"{args.engine} (CPU), fp32, eager",
            "worker_cpus": args.worker_cpus or "the server's choice (every core)",
            "base_model": args.model, "checkpoint": args.checkpoint,
            "adapters": args.adapters, "max_adapters": args.max_adapters,
            "clients": args.clients, "requests": args.requests,
            "max_tokens": args.max_tokens, "zipf": args.zipf,
            "distinct_adapters_in_traffic": len(set(models)),
            "streams": args.streams, "stream_tokens": args.stream_tokens,
            "probe_window_s": args.probe_window,
        }
        record = {"meta": meta, "summary": summary, "warm_up": asdict(warm) | {
            "tokens_per_s": warm.tokens_per_s},
            "runs": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in runs],
            "probe": probe_runs, "probe_windows": window_runs, "load_seconds": loads,
            "idle_load_seconds": idle}
        write_results(Path(args.out), record)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def write_results(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.parent.joinpath(f"{out.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    meta, s = record["meta"], record["summary"]
    disk, cache = s["load_from_disk"], s["load_from_cache"]

    def latency(entry: dict) -> str:
        if not entry["count"]:
            return "- (none)"
        return f"{entry['p50_ms']:.1f} / {entry['p95_ms']:.1f} ms ({entry['count']} loads)"

    engine = meta["engine"].split()[0]
    lines = [f"# Adapter library on the {'SGLang' if engine == 'sglang' else 'vLLM'} CPU "
             "engine", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += [
        "", "| measure | result | goal |", "|---|---|---|",
        f"| throughput, library / one adapter | {s['throughput_ratio_median']:.3f}x "
        f"({s['library_tokens_per_s']:.1f} / {s['one_adapter_tokens_per_s']:.1f} tok/s; "
        f"pairs {', '.join(f'{r:.3f}' for r in s['throughput_ratios'])}) | >= 0.9x |",
        f"| load from disk, idle engine, p50 / p95 | {latency(s['idle_load_from_disk'])} | |",
        f"| load from the host cache, idle engine, p50 / p95 | "
        f"{latency(s['idle_load_from_cache'])} | |",
        f"| load from disk under the traffic, p50 / p95 | {latency(disk)} | |",
        f"| load from the host cache under the traffic, p50 / p95 | {latency(cache)} | |",
        f"| load from disk during the decode probe, p50 / p95 | "
        f"{latency(s['probe_load_from_disk'])} | |",
        f"| decode step while loading / no load | {s['decode_step_ratio']:.3f}x "
        f"({s['decode_gap_loading_ms']:.1f} / {s['decode_gap_no_load_ms']:.1f} ms between "
        f"tokens) | <= 1.05x |",
        f"| same, loading and quiet windows of {meta['probe_window_s']:g} s interleaved "
        f"in one run | {s['decode_step_ratio_interleaved']:.3f}x "
        f"({s['decode_gap_loading_interleaved_ms']:.1f} / "
        f"{s['decode_gap_no_load_interleaved_ms']:.1f} ms; "
        f"runs {', '.join(f'{r:.3f}' for r in s['decode_step_ratios_interleaved'])}) "
        f"| <= 1.05x |",
        f"| decode time lost per load during the probe | "
        f"{s['decode_lost_per_load_ms']:.1f} ms | |",
        "| CPU per load + unload from disk, idle engine | " + ", ".join(
            f"{role} {ms:.1f} ms" for role, ms in s["cpu_ms_per_load_and_unload"].items())
        + " | |",
        f"| evictions over the run | {s['evictions']:.0f} | |", "",
        "Throughput: completion tokens per second of the whole pass, the same requests "
        "(prompts, lengths, order) sent to Zipf-drawn adapters or all to the most popular "
        "one; each pair's ratio, and their median. Load latency: the server's own timing "
        "of each load (validation or the cache, then the engine; not the wait for a "
        "place); idle engine: the --max-adapters + 2 least popular adapters asked for one at "
        "a time, twice, "
        "before the traffic. Decode step: the median gap between streamed tokens of the probe's "
        "streams, with adapters loaded and unloaded back to back meanwhile or not; time lost "
        "per load: the loading runs' extra stream time (mean gaps) over their loads; "
        "interleaved: one run of the streams while the loader alternates windows of loads "
        "and of none, each gap counted for the window that holds it whole. CPU: "
        "user + system time of each process per load and unload (vLLM's workers' includes "
        "vLLM's polling of its message queue after each call).",
    ]
    out.parent.joinpath(f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
