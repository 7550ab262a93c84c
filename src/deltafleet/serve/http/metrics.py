"""Prometheus metrics (text format 0.0.4, by `prometheus_client`): what the HTTP layer observes, and the engine
state read from the gateway at scrape time.

Observed by the HTTP layer as the client sees them: time to first token from the request's arrival to its first
generated chunk, per-token latency between consecutive chunks of a request, responses by endpoint and status,
and requests and generated tokens per model (the base model's name or the adapter's). Engine state (queue
depth, running requests, tokens, adapter cache) comes from `Gateway.replica_stats()` when scraped.

A single server's series carry no replica label. Behind the Ray Serve ingress (`Metrics(per_replica=True)`)
every latency, per-model and engine series carries `replica` (the Serve replica that ran the request), so a
dashboard can split them per replica (`deploy/grafana/deltafleet.json`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4"
disable_created_metrics()  # no `_created` series: Prometheus does not need them and they double the text

# engine stats key -> (metric family, type, help); `adapter_cache.<key>` reads the nested cache counters
ENGINE_SERIES = (
    ("waiting", "deltafleet_queue_depth", "gauge", "Requests waiting for a batch slot."),
    ("running", "deltafleet_running_requests", "gauge", "Requests in the running batch."),
    ("max_batch", "deltafleet_max_batch", "gauge", "Batch slots (KV-cache sequences)."),
    ("generated_tokens", "deltafleet_generated_tokens", "counter", "Tokens generated."),
    ("prompt_tokens", "deltafleet_prompt_tokens", "counter", "Prompt tokens prefilled."),
    ("finished", "deltafleet_finished_requests", "counter", "Requests the engine finished (any reason)."),
    ("resident_adapters", "deltafleet_resident_adapters", "gauge", "Adapters in device slots."),
    ("adapter_cache.hits", "deltafleet_adapter_cache_hits", "counter", "Adapter requests that found it resident."),
    ("adapter_cache.misses", "deltafleet_adapter_cache_misses", "counter",
     "Adapter requests that copied it into a slot."),
    ("adapter_cache.evictions", "deltafleet_adapter_cache_evictions", "counter",
     "Resident adapters evicted from their slot."),
    ("adapter_cache.host_evictions", "deltafleet_adapter_cache_host_evictions", "counter",
     "Loaded adapters dropped from host memory."),
    ("adapter_cache.loads", "deltafleet_adapter_cache_loads", "counter", "Adapter loads from disk."),
)


def _read(stats: dict, key: str) -> float:
    head, _, tail = key.partition(".")
    value = stats.get(head, 0)
    return float(value.get(tail, 0) if tail else value)


class EngineCollector:
    """The engine state of each replica, read when scraped (`stats_by_replica`: replica name -> engine stats; a
    name of "" is a single server's engine, rendered without the replica label)."""

    def __init__(self, stats_by_replica: dict[str, dict]):
        self.stats_by_replica = stats_by_replica

    def collect(self) -> Iterator[Metric]:
        labelled = any(self.stats_by_replica)
        for key, name, type_, help_ in ENGINE_SERIES:
            family = (GaugeMetricFamily if type_ == "gauge" else CounterMetricFamily)(
                name, help_, labels=["replica"] if labelled else [])
            for replica, stats in sorted(self.stats_by_replica.items()):
                family.add_metric([replica] if labelled else [], _read(stats, key))
            yield family


class Metrics:
    def __init__(self, per_replica: bool = False):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["replica"] if per_replica else []
        self.per_replica = per_replica
        self.ttft = Histogram("deltafleet_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("deltafleet_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.", labels,
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.responses = Counter("deltafleet_http_responses", "HTTP responses by endpoint and status.",
                                 ["endpoint", "status"], registry=self.registry)
        self.model_requests = Counter("deltafleet_model_requests", "Generation requests submitted, by model "
                                      "(the base model's name or an adapter's).", [*labels, "model"],
                                      registry=self.registry)
        self.model_tokens = Counter("deltafleet_model_generated_tokens", "Tokens generated, by model.",
                                    [*labels, "model"], registry=self.registry)

    def _labels(self, replica: str) -> dict[str, str]:
        return {"replica": replica} if self.per_replica else {}

    def response(self, endpoint: str, status: int) -> None:
        self.responses.labels(endpoint=endpoint, status=str(status)).inc()

    def first_token(self, seconds: float, replica: str = "") -> None:
        self._hist(self.ttft, replica).observe(seconds)

    def next_token(self, seconds: float, replica: str = "") -> None:
        self._hist(self.itl, replica).observe(seconds)

    def _hist(self, h: Histogram, replica: str):
        return h.labels(replica=replica) if self.per_replica else h

    def request(self, model: str, replica: str = "") -> None:
        self.model_requests.labels(model=model, **self._labels(replica)).inc()

    def tokens(self, model: str, n: int, replica: str = "") -> None:
        if n > 0:
            self.model_tokens.labels(model=model, **self._labels(replica)).inc(n)

    def render(self, stats_by_replica: dict[str, dict]) -> str:
        engine = CollectorRegistry(auto_describe=False)
        engine.register(EngineCollector(stats_by_replica))
        return (generate_latest(engine) + generate_latest(self.registry)).decode()
