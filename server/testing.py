"""Helpers for tests and benchmarks: a real ``talan-serve`` process on loopback.

Test-only dependencies (lm-eval) are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"
SERVED_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TALAN_SERVE_CACHE=os.environ.get("TALAN_SERVE_CACHE", str(cache / "talan")),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        raise KeyError(key)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(model_dir: Path, workdir: Path, *extra: str) -> ServerProcess:
    """``talan-serve`` on a free loopback port (fp32, eager, API key), ready for requests."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    command = [
        sys.executable, "-m", "server.cli", "--model", str(model_dir),
        "--served-model-name", SERVED_NAME, "--port", str(port), "--api-key", API_KEY,
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
        "--log-level", "warning", *extra,
    ]
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=engine_env(workdir), stdout=sink,
                                   stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-4000:]}")


# ---- lm-evaluation-harness on local files --------------------------------------------

WORDS = "the water call first who people side number sound apples sum total solve".split()


def write_tasks(root: Path) -> Path:
    """Two lm-eval tasks over local jsonl (no downloads): ``tiny_mc`` (loglikelihood,
    multiple choice, acc) and ``tiny_gen`` (generate_until, exact_match)."""
    rng = random.Random(0)
    mc = [{"question": " ".join(rng.choice(WORDS) for _ in range(6)),
           "choices": [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
                       for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(12)]
    gen = [{"question": "Question: " + " ".join(rng.choice(WORDS) for _ in range(5)) +
            "\nAnswer:", "answer": rng.choice(WORDS)} for _ in range(8)]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def evaluate(model, task_manager, tasks, **kwargs):
    """``lm_eval.simple_evaluate`` keeping per-sample outputs, without bootstrap stderr."""
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager,
                                   log_samples=True, bootstrap_iters=0, **kwargs)


def samples(results, task):
    """Per-document records of one task, in document order."""
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])
