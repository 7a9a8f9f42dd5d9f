"""Prometheus metrics, on a registry per app (tests start several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "talan_serve_requests", "Finished HTTP requests to the OpenAI endpoints",
            ["endpoint", "status"], registry=r,
        )
        self.prompt_tokens = Counter(
            "talan_serve_prompt_tokens", "Prompt tokens processed", registry=r
        )
        self.generation_tokens = Counter(
            "talan_serve_generation_tokens", "Tokens generated", registry=r
        )
        self.latency = Histogram(
            "talan_serve_request_latency_seconds", "End-to-end request latency",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.first_token = Histogram(
            "talan_serve_time_to_first_token_seconds",
            "Time to the first generated token (streamed requests)",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "talan_serve_queue_depth", "Admitted requests still waiting for a first token",
            registry=r,
        )
        self.running = Gauge(
            "talan_serve_requests_running", "Admitted requests not yet finished", registry=r
        )
        self.talan = Counter(
            "talan_serve_talan_requests", "Requests by TALAN side-path switch",
            ["talan"], registry=r,
        )
        self.aborted = Counter(
            "talan_serve_requests_aborted", "Requests aborted in the engine before finishing",
            ["reason"], registry=r,
        )
        self.rejected = Counter(
            "talan_serve_requests_rejected", "Requests refused because the queue was full",
            registry=r,
        )
        # Pre-create label sets, so a scrape shows zeros instead of missing series.
        for switch in ("on", "off"):
            self.talan.labels(switch)
        self.aborted.labels("client_disconnect")

    def render(self) -> bytes:
        return generate_latest(self.registry)
