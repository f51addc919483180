"""The Prometheus metrics of one server, on `GET /metrics` (prometheus_client)."""

from __future__ import annotations

import os


class ServingMetrics:
    """The Prometheus metrics of one server; with several workers (PROMETHEUS_MULTIPROC_DIR set)
    every worker writes its own files and `/metrics` sums them (prometheus_client's multiprocess mode)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

        self.registry = CollectorRegistry()
        shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if shared:
            multiprocess.MultiProcessCollector(self.registry)
        target = None if shared else self.registry
        self.requests = Counter("slmkit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=target)  # fmt: skip
        self.prompt_tokens = Counter("slmkit_prompt_tokens", "Prompt tokens of answered chat requests", registry=target)
        self.completion_tokens = Counter("slmkit_completion_tokens", "Completion tokens generated", registry=target)
        self.latency = Histogram("slmkit_request_seconds", "Time from request to the last byte of the answer",
                                 ["route"], registry=target,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))  # fmt: skip
        self.first_token = Histogram("slmkit_time_to_first_token_seconds",
                                     "Time from a streamed request to its first content chunk", registry=target,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip
        self.in_flight = Gauge("slmkit_requests_in_flight", "Chat requests being answered now",
                               registry=target, multiprocess_mode="livesum")  # fmt: skip
        self.batch_size = Histogram("slmkit_batch_size", "Rows of each decoding batch as it starts",
                                    registry=target, buckets=(1, 2, 3, 4, 6, 8, 12, 16))  # fmt: skip

    def count_usage(self, usage: dict[str, int] | None) -> None:
        if usage:
            self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            self.completion_tokens.inc(usage.get("completion_tokens", 0))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
