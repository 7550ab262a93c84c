"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and two histograms.

Latencies are observed by the HTTP layer as the client sees them: time to first token from the request's
arrival to its first generated chunk, and per-token latency between consecutive chunks of a request. Engine
state (queue depth, running requests, tokens, adapter cache) is read from the gateway at scrape time.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative counts per upper bound, plus sum and count (what Prometheus' histogram_quantile reads)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last one: +Inf
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds
            self.count += 1

    def render(self, name: str, help_: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        with self._lock:
            acc = 0
            for bound, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
                acc += c
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{name}_bucket{{le="{le}"}} {acc}')
            lines += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.responses: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self._lock = threading.Lock()

    def response(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.responses[(endpoint, status)] += 1

    def render(self, stats: dict) -> str:
        cache = stats.get("adapter_cache", {})
        out: list[str] = []

        def metric(name: str, type_: str, help_: str, value) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {type_}", f"{name} {value}"])

        metric("deltafleet_queue_depth", "gauge", "Requests waiting for a batch slot.", stats["waiting"])
        metric("deltafleet_running_requests", "gauge", "Requests in the running batch.", stats["running"])
        metric("deltafleet_max_batch", "gauge", "Batch slots (KV-cache sequences).", stats["max_batch"])
        metric("deltafleet_generated_tokens_total", "counter", "Tokens generated.", stats["generated_tokens"])
        metric("deltafleet_prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats["prompt_tokens"])
        metric("deltafleet_finished_requests_total", "counter", "Requests the engine finished (any reason).",
               stats["finished"])
        metric("deltafleet_resident_adapters", "gauge", "Adapters in device slots.", stats["resident_adapters"])
        for key, help_ in (("hits", "Adapter requests that found it resident."),
                           ("misses", "Adapter requests that copied it into a slot."),
                           ("evictions", "Resident adapters evicted from their slot."),
                           ("host_evictions", "Loaded adapters dropped from host memory."),
                           ("loads", "Adapter loads from disk.")):
            metric(f"deltafleet_adapter_cache_{key}_total", "counter", help_, cache.get(key, 0))
        out += self.ttft.render("deltafleet_time_to_first_token_seconds",
                                "Time from request arrival to its first generated token.")
        out += self.itl.render("deltafleet_inter_token_latency_seconds",
                               "Time between consecutive generated tokens of a request.")
        out += ["# HELP deltafleet_http_responses_total HTTP responses by endpoint and status.",
                "# TYPE deltafleet_http_responses_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.responses.items()):
                out.append(f'deltafleet_http_responses_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        return "\n".join(out) + "\n"
