"""Prometheus metrics for every process (API, worker, sink), with prometheus-client.

One module-level set of metrics in the default registry, fed where the work happens:

- ``CostLedger.record`` calls :func:`observe_cost`, so every stage's LLM calls, tokens, items and seconds
  become counters and a latency histogram (in Kafka mode the ledgers are otherwise never read);
- dead letters: :func:`observe_dead_letter` wherever one is sent (embedded log, Kafka DLQ producers);
- store writes: :func:`store_write` times an upsert/delete;
- consumer lag: :func:`set_consumer_lag`, set by the worker and the sink per topic-partition;
- HTTP: the API's middleware observes :data:`HTTP_REQUESTS` and :data:`HTTP_SECONDS` by route template and status.

The API serves ``/metrics`` itself (:func:`render`); worker and sink call :func:`serve` for a port of their own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest, start_http_server

from schemas import DeadLetter, StageCost

# latency buckets from sub-millisecond searches to minute-long LLM extractions
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

HTTP_REQUESTS = Counter(
    "lightmem_http_requests",
    "HTTP requests served, by route template, method and status",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "lightmem_http_request_seconds",
    "HTTP request latency by route template and method",
    ["route", "method"],
    buckets=_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "lightmem_stage_seconds", "seconds one unit of work (a batch, a call) spent in a stage", ["stage"], buckets=_BUCKETS
)
STAGE_ITEMS = Counter("lightmem_stage_items", "records processed per stage", ["stage"])
LLM_CALLS = Counter("lightmem_llm_calls", "LLM calls per stage", ["stage"])
LLM_TOKENS = Counter("lightmem_llm_tokens", "LLM tokens per stage and direction (input/output)", ["stage", "direction"])
DEAD_LETTERS = Counter("lightmem_dead_letters", "dead-letter records by stage and error type", ["stage", "error_type"])
STORE_WRITE_SECONDS = Histogram(
    "lightmem_store_write_seconds", "long-term store write latency by operation", ["op"], buckets=_BUCKETS
)
CONSUMER_LAG = Gauge(
    "lightmem_consumer_lag", "records behind the end of each topic-partition", ["group", "topic", "partition"]
)
SEARCH_BATCH = Histogram(
    "lightmem_search_encode_batch", "queries embedded together in one encoder pass", buckets=(1, 2, 4, 8, 16, 32, 64)
)


def observe_cost(cost: StageCost) -> None:
    """One StageCost (as recorded by a CostLedger) into the per-stage counters and latency histogram."""
    stage = cost.stage
    if cost.seconds > 0:
        STAGE_SECONDS.labels(stage).observe(cost.seconds)
    if cost.items:
        STAGE_ITEMS.labels(stage).inc(cost.items)
    if cost.calls:
        LLM_CALLS.labels(stage).inc(cost.calls)
    if cost.input_tokens:
        LLM_TOKENS.labels(stage, "input").inc(cost.input_tokens)
    if cost.output_tokens:
        LLM_TOKENS.labels(stage, "output").inc(cost.output_tokens)


def observe_dead_letter(record: DeadLetter) -> None:
    DEAD_LETTERS.labels(record.stage, record.error_type).inc()


def set_consumer_lag(group: str, topic: str, partition: int, lag: int) -> None:
    CONSUMER_LAG.labels(group, topic, str(partition)).set(max(0, lag))


@contextmanager
def store_write(op: str) -> Iterator[None]:
    """Time one store write (``upsert``, ``delete``, ``delete_user``)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        STORE_WRITE_SECONDS.labels(op).observe(time.perf_counter() - t0)


def observe_http(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_SECONDS.labels(route, method).observe(seconds)


def render() -> tuple[bytes, str]:
    """The exposition text of the default registry and its content type (for an API's ``/metrics``)."""
    return generate_latest(), CONTENT_TYPE_LATEST


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on a port of its own (worker, sink), from a daemon thread."""
    start_http_server(port, addr=host)
