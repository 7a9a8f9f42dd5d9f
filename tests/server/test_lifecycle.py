"""How a server ends: SIGTERM drains in-flight requests; an engine that dies fails them,
turns /health to 503 and makes the process exit non-zero (for a supervisor to restart).
Each test stops its own server."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.server.support import API_KEY, start_server

pytestmark = pytest.mark.slow
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def test_sigterm_drains_in_flight_requests(model_dir, workdir):
    server = start_server(model_dir, workdir)
    with server.client() as c, c.stream("POST", "/v1/completions", json={
            "prompt": "the", "max_tokens": 120, "ignore_eos": True, "stream": True,
            "temperature": 0}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    events = [first, *rest]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the captured SIGTERM once drained: exit by that signal (or 0).
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health", timeout=2)


def _engine_core(pid: int) -> psutil.Process:
    for child in psutil.Process(pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError("no engine core process under the server")


def test_engine_death_fails_requests_and_exits_nonzero(model_dir, workdir):
    server = start_server(model_dir, workdir)
    outcomes: dict[str, str] = {}
    started = threading.Barrier(4)

    def stream(name: str) -> None:
        body = {"prompt": "the", "max_tokens": 450, "ignore_eos": True, "stream": True}
        try:
            with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60) as c, \
                    c.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                started.wait()
                events = [line for line in lines if line.startswith("data: ")]
            outcomes[name] = "error event" if any('"error"' in e for e in events) else \
                f"ended: {events[-1:] or 'nothing'}"
        except (httpx.HTTPError, threading.BrokenBarrierError) as error:
            outcomes[name] = f"connection error: {type(error).__name__}"

    def plain(name: str) -> None:
        body = {"prompt": "the", "max_tokens": 450, "ignore_eos": True}
        try:
            with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60) as c:
                started.wait()
                response = c.post("/v1/completions", json=body)
            outcomes[name] = f"status {response.status_code}"
        except (httpx.HTTPError, threading.BrokenBarrierError) as error:
            outcomes[name] = f"connection error: {type(error).__name__}"

    threads = [threading.Thread(target=stream, args=(f"stream-{i}",)) for i in range(2)]
    threads.append(threading.Thread(target=plain, args=("plain",)))
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    time.sleep(0.5)  # the plain request is in the engine too
    _engine_core(server.process.pid).kill()
    killed = time.monotonic()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    ended = time.monotonic() - killed
    # No client got a normal end: each saw an error (or the connection close).
    assert all(not o.startswith("ended: ['data: [DONE]']") for o in outcomes.values()), outcomes
    assert outcomes["plain"] in ("status 503", "connection error: RemoteProtocolError",
                                 "connection error: ReadError"), outcomes
    try:
        health = httpx.get(f"{server.base_url}/health", timeout=5).status_code
    except httpx.HTTPError:
        health = None  # already gone
    assert health in (503, None)
    status = server.process.wait(timeout=60)
    assert status not in (0, None), status
    print(f"engine killed: clients done in {ended:.1f} s, exit status {status}, "
          f"outcomes {outcomes}")
