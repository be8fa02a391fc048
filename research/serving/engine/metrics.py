"""Prometheus metrics of the serving engine, under vLLM's names where vLLM has one.

Each `ServingMetrics` has its own CollectorRegistry (several engines in one process, e.g.
tests, never collide); the server exposes `generate_latest(metrics.registry)` at /metrics.
Dashboards and autoscalers written for vLLM read these unchanged.
"""

import prometheus_client as prom

# Latency buckets (seconds): vLLM's, from interactive to batch.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0)  # fmt: skip


class ServingMetrics:
    """The engine's counters, gauges and histograms. `model_name` labels every series."""

    def __init__(self, model_name: str = "cirrus"):
        self.registry = prom.CollectorRegistry()
        labels = ["model_name"]

        def histogram(name, doc, buckets):
            return prom.Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        def counter(name, doc, extra=()):
            return prom.Counter(name, doc, labels + list(extra), registry=self.registry)

        def gauge(name, doc):
            return prom.Gauge(name, doc, labels, registry=self.registry)

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS
        )
        self.e2e_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to end.", _E2E_BUCKETS
        )
        self.running = gauge("vllm:num_requests_running", "Requests in decode slots.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests queued for a slot.")
        self.kv_cache_usage = gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV cache positions in use (1 = full)."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache."
        )
        self.request_success = counter(
            "vllm:request_success", "Finished requests.", extra=("finished_reason",)
        )
        self._label = {"model_name": model_name}

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.labels(**self._label).observe(seconds)

    def tokens(self, count: int, seconds_each: float | None) -> None:
        """`count` new tokens; seconds_each = the gap per token since the previous ones."""
        self.generation_tokens.labels(**self._label).inc(count)
        if seconds_each is not None:
            histogram = self.inter_token_latency.labels(**self._label)
            for _ in range(count):
                histogram.observe(seconds_each)

    def prompt(self, tokens: int, cached: int) -> None:
        self.prompt_tokens.labels(**self._label).inc(tokens)
        self.prefix_queries.labels(**self._label).inc(tokens)
        self.prefix_hits.labels(**self._label).inc(cached)

    def finished(self, reason: str, seconds: float) -> None:
        self.request_success.labels(finished_reason=reason, **self._label).inc()
        self.e2e_latency.labels(**self._label).observe(seconds)

    def occupancy(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.labels(**self._label).set(running)
        self.waiting.labels(**self._label).set(waiting)
        self.kv_cache_usage.labels(**self._label).set(kv_usage)
