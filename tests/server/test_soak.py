"""A bounded soak: thousands of requests of random sizes, a third abandoned midway. After a
warm-up (the engine's per-shape caches fill up), memory and the engine's unfinished
requests come back to where they started, process by process."""

from __future__ import annotations

import json

import pytest

from tests.server.support import bench_module, start_server

pytestmark = pytest.mark.slow


def test_soak_leaves_no_requests_and_no_memory_behind(model_dir, workdir):
    soak = bench_module("soak_server")
    # A small KV cache, which the warm-up touches whole: the check sees leaks, not cache
    # pages used for the first time.
    server = start_server(model_dir, workdir, "--kv-cache-memory-bytes", str(16 * 2**20))
    try:
        report = soak.soak(server, count=1500, concurrency=16, disconnect_rate=0.3,
                           max_tokens=24, max_seconds=300, warmup=2500)
    finally:
        server.stop()
    print(json.dumps(report.as_dict()))
    assert report.requests == 1500, "the soak hit its time bound"
    assert report.disconnects > 0.2 * report.requests
    assert set(report.statuses) <= {"200", "disconnected"}, report.statuses
    assert report.unfinished_after == 0 and report.running_after == 0
    for name, before in report.rss_mb_by_process_before.items():
        assert report.rss_mb_by_process_after[name] < before * 1.01 + 8, (name, report)
