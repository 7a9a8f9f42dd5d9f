"""Prometheus metrics, on a registry per app (tests start several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Why an adapter was refused (server.adapter_errors.AdapterRefused.reason).
REFUSAL_REASONS = ("name", "path", "checkpoint", "unfit")
LOAD_SOURCES = ("disk", "cache")


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
        self.adapters = AdapterMetrics(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AdapterMetrics:
    """A server of many adapters: loads (from disk or the host cache) and their seconds,
    evictions, adapters loaded now, requests per adapter, refused adapters by reason.
    ``server.adapters.ServedAdapters`` reports to it (``AdapterEvents``)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.loads = Counter("talan_serve_adapter_loads", "Adapters loaded into the engine",
                             ["source"], registry=r)
        self.load_seconds = Histogram(
            "talan_serve_adapter_load_seconds",
            "Seconds to load an adapter (validation or the cache, then the engine; not "
            "the wait for a place)", ["source"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("talan_serve_adapter_evictions",
                                 "Adapters evicted to make room (least recently used)",
                                 registry=r)
        # Read from the server's adapters when it has many (server.app).
        self.loaded_now = Gauge("talan_serve_adapters_loaded", "Adapters loaded now",
                                registry=r)
        self.requests = Counter("talan_serve_adapter_requests", "Requests per adapter",
                                ["adapter"], registry=r)
        self.refusals = Counter("talan_serve_adapter_refused",
                               "Requests and loads refused for a bad adapter, by reason",
                               ["reason"], registry=r)
        for source in LOAD_SOURCES:
            self.loads.labels(source)
            self.load_seconds.labels(source)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)

    def loaded(self, name: str, source: str, seconds: float) -> None:
        self.loads.labels(source).inc()
        self.load_seconds.labels(source).observe(seconds)

    def evicted(self, name: str) -> None:
        self.evictions.inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def request(self, name: str) -> None:
        self.requests.labels(name).inc()
