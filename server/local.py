"""A ``talan-serve`` process on a loopback port, for evaluation scripts and benchmarks.

``start_local_server`` returns once ``/health`` answers 200; the process keeps its log in
the given work folder and goes away with ``stop()`` (SIGTERM: a graceful drain).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_env(cache: Path) -> dict[str, str]:
    """This environment, offline, with the engine's caches under ``cache`` (vLLM's where
    the environment names none)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        VLLM_CACHE_ROOT=os.environ.get("VLLM_CACHE_ROOT", str(cache / "vllm")),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TALAN_SERVE_CACHE=os.environ.get("TALAN_SERVE_CACHE", str(cache / "talan")),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@dataclass
class LocalServer:
    process: subprocess.Popen
    base_url: str
    log: Path
    api_key: str | None = None

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120, **kwargs)

    def openai(self) -> Any:
        """An OpenAI SDK client for this server (no retries: tests see every answer)."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "unused",
                             max_retries=0)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        raise KeyError(key)

    def wait_healthy(self, timeout: float) -> None:
        """Until ``/health`` answers 200 (the process stopped, or ``timeout``: an error
        with the end of its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_local_server(
    model: str | Path,
    workdir: Path,
    *args: str,
    api_key: str | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> LocalServer:
    """``talan-serve --model MODEL ARGS...`` on a free loopback port, once it is healthy;
    ``env`` is added to ``engine_env(workdir)``."""
    command = [sys.executable, "-m", "server.cli", "--model", str(model),
               *(["--api-key", api_key] if api_key else []), *args]
    return start_on_free_port(lambda port: [*command, "--port", str(port)], workdir,
                              {**engine_env(workdir), **(env or {})}, timeout=timeout,
                              api_key=api_key)


def start_on_free_port(
    command: Callable[[int], list[str]],
    workdir: Path,
    env: dict[str, str],
    *,
    timeout: float,
    api_key: str | None = None,
    log_name: str = "server",
    new_session: bool = False,
) -> LocalServer:
    """``command(port)``, an HTTP server, on a free loopback port, once its ``/health``
    answers 200; its log is ``workdir/{log_name}-{port}.log``. ``new_session``: in its
    own process group (``os.killpg`` then reaches the processes it starts)."""
    workdir.mkdir(parents=True, exist_ok=True)
    attempts = PORT_ATTEMPTS
    while True:
        # Another process may take the free port before the server binds it (its first
        # seconds of imports); the server then exits at once, and another port is tried.
        port = free_port()
        log = workdir / f"{log_name}-{port}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(command(port), env=env, stdout=sink,
                                       stderr=subprocess.STDOUT, start_new_session=new_session)
        server = LocalServer(process, f"http://127.0.0.1:{port}", log, api_key)
        try:
            server.wait_healthy(timeout)
            return server
        except RuntimeError:
            attempts -= 1
            if attempts == 0 or "Address already in use" not in log.read_text():
                raise
