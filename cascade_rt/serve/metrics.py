"""Prometheus metrics of one server (prometheus-client), in a registry of its own (docs/serving.md, "Metrics")."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("cascade_rt_queue_depth", "requests waiting for a batch", registry=r)
        self.in_flight = Gauge("cascade_rt_requests_running", "requests in a batch that is running", registry=r)
        self.ready = Gauge("cascade_rt_ready", "1 once weights are loaded and warm-up is done", registry=r)
        self.batch_size = Histogram("cascade_rt_batch_size_images", "images per model batch", registry=r,
                                    buckets=tuple(range(1, max_batch + 1)))
        self.batches = Counter("cascade_rt_batches", "model batches run, by outcome", ["outcome"], registry=r)
        self.stage_seconds = Histogram("cascade_rt_stage_seconds", "seconds per stage per batch", ["stage"],
                                       registry=r, buckets=LATENCY_BUCKETS)
        self.batch_seconds = Histogram("cascade_rt_batch_seconds", "seconds per model batch", registry=r,
                                       buckets=LATENCY_BUCKETS)
        self.request_seconds = Histogram("cascade_rt_request_seconds", "end-to-end seconds per request",
                                         ["endpoint"], registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter("cascade_rt_requests", "answered requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)

    def observe_batch(self, images: int, outcome: Any, seconds: float) -> None:
        failed = isinstance(outcome, Exception)
        self.batches.labels("error" if failed else "ok").inc()
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)
        if not failed:
            for stage, s in outcome.timings.items():
                self.stage_seconds.labels(stage).observe(s)

    def observe_request(self, endpoint: str, status: int, seconds: float | None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if seconds is not None and status == 200:
            self.request_seconds.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
