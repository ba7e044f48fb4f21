"""`GET /metrics`: the gateway's counters in the Prometheus text format, from `prometheus_client`.

With several workers (separate processes), each writes its samples to files
in `PROMETHEUS_MULTIPROC_DIR` (the runner makes a fresh one), and `/metrics`,
whichever worker answers it, adds up every worker's.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """One set of metrics per process, in a registry of its own (several apps in one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version", "route")
        self.requests = Counter("mlflow_dspy_requests_total", "Requests answered, by model, version, route and "
                                "status", (*labels, "status"), registry=self.registry)
        self.latency = Histogram("mlflow_dspy_request_seconds", "Time from the request to the end of its answer",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("mlflow_dspy_time_to_first_token_seconds", "Time from the request to the "
                                     "first streamed text", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("mlflow_dspy_prompt_tokens_total", "Prompt tokens sent to the LM",
                                     ("model", "version"), registry=self.registry)
        self.completion_tokens = Counter("mlflow_dspy_completion_tokens_total", "Completion tokens from the LM",
                                         ("model", "version"), registry=self.registry)
        self.in_flight = Gauge("mlflow_dspy_requests_in_flight", "Requests running a program now",
                               registry=self.registry, multiprocess_mode="livesum")
        self.reloads = Counter("mlflow_dspy_reloads_total", "Model versions loaded after start-up",
                               ("model",), registry=self.registry)
        self.reload_failures = Counter("mlflow_dspy_reload_failures_total", "Model versions that failed to load "
                                       "or to answer after start-up", ("model",), registry=self.registry)
        self.model_refusals = Counter(
            "mlflow_dspy_model_refusals_total", "Model versions refused before anything of them was loaded, by "
            "reason: tampered (a file differs from the manifest or the recorded SHA-256), unsigned, untrusted_key, "
            "bad_signature (with a trust key), unverified (nothing to check it against)", ("model", "reason"),
            registry=self.registry)
        self.traces = Counter("mlflow_dspy_traces_total", "Request traces, by what became of them: queued for the "
                              "tracking store, written, dropped (the queue was full, the store failed, or the "
                              "process stopped first) or sampled out", ("outcome",), registry=self.registry)
        self.prefix_cache = Counter("mlflow_dspy_embedded_prefix_cache_total", "The embedded model's prompt-prefix "
                                    "cache: hits, misses and evictions", ("outcome",), registry=self.registry)
        self.prefix_cache_bytes = Gauge("mlflow_dspy_embedded_prefix_cache_bytes", "Saved prefix states held",
                                        registry=self.registry, multiprocess_mode="livesum")
        self.sequences = Gauge("mlflow_dspy_embedded_requests", "The embedded model's requests: decoding now "
                               "(running) or waiting for a sequence", ("state",), registry=self.registry,
                               multiprocess_mode="livesum")
        self._cache_reported = {"hits": 0, "misses": 0, "evictions": 0}

    def observe(self, model: str, version: str, route: str, status: int, seconds: float,
                first_token: float | None, usage: tuple[int, int] | None) -> None:
        """One answered request (called once, after its response has left)."""
        self.requests.labels(model, version, route, str(status)).inc()
        self.latency.labels(model, version, route).observe(seconds)
        if first_token is not None:
            self.first_token.labels(model, version, route).observe(first_token)
        if usage:
            self.prompt_tokens.labels(model, version).inc(usage[0])
            self.completion_tokens.labels(model, version).inc(usage[1])

    def refresh_embedded(self, stats: dict | None) -> None:
        """Bring the embedded model's figures (lm_engine's `embedded_stats()`) into /metrics."""
        if not stats:
            return
        cache = stats["cache"]
        for key, outcome in (("hits", "hit"), ("misses", "miss"), ("evictions", "eviction")):
            new = cache[key] - self._cache_reported[key]
            if new > 0:
                self.prefix_cache.labels(outcome).inc(new)
                self._cache_reported[key] = cache[key]
        self.prefix_cache_bytes.set(cache["bytes"])
        self.sequences.labels("running").set(stats["running"])
        self.sequences.labels("waiting").set(stats["waiting"])

    def exposition(self) -> tuple[bytes, str]:
        """The text `/metrics` answers: this process's samples, or every worker's with several."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """A worker that stops takes its live gauges with it (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
