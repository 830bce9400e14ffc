"""Prometheus metrics, on a registry owned by one app (no process-global collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from winnow.engine.engine_core import StepStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("winnow_requests", "HTTP requests by route, status.", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "winnow_request_duration_seconds", "End-to-end latency.", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "winnow_queue_duration_seconds", "Time a prompt waits for its batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "winnow_inference_duration_seconds", "Forward + pooling per batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("winnow_batch_size", "Sequences per batch.", buckets=_COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("winnow_batch_tokens", "Tokens per batch.", buckets=_TOKEN_BUCKETS, registry=r)
        self.padding_fraction = Histogram(
            "winnow_batch_padding_fraction",
            "Share of a batch's padded attention grid that is padding.",
            buckets=_FRACTION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("winnow_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.queue_depth = Gauge("winnow_queue_depth", "Prompts waiting for a batch.", registry=r)
        self.in_flight = Gauge("winnow_requests_in_flight", "HTTP inference requests being served.", registry=r)

    def observe_step(self, stats: StepStats) -> None:
        """Called by an engine loop thread after every batch, by several at once with CPU workers
        (prometheus_client is thread-safe)."""
        self.batch_size.observe(stats.num_seqs)
        self.batch_tokens.observe(stats.num_tokens)
        self.padding_fraction.observe(stats.padding_fraction)
        self.inference_seconds.observe(stats.run_seconds)
        self.prompt_tokens.inc(stats.num_tokens)
        for seconds in stats.queue_seconds:
            self.queue_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
