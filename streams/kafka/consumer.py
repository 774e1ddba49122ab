"""The consumer-service shape shared by the LTM sink and the compaction agent, written once.

``ConsumerService`` starts a group consumer (auto-commit off) and a producer, polls batches, hands each to
``process`` and commits the batch's offsets only after ``process`` returned (after the write). Failures:

- a **transient** error (the store or the broker does not answer: anything but ``PermanentError`` and the
  programming errors ``ValueError``/``TypeError``/``KeyError`` that a subclass turns into dead letters itself)
  keeps the batch in memory, **pauses** every assigned partition and keeps polling, so the consumer
  heartbeats and stays in its group however long the outage lasts (no ``max_poll_interval_ms`` eviction);
  the batch is retried with exponential backoff (``tenacity``'s wait strategy) and the partitions resume
  once it went through. Nothing is committed meanwhile; if the process dies, Kafka redelivers the batch.
- a rebalance that takes partitions away drops the held records of those partitions (their new owner
  starts from the committed offsets).

Subclasses implement ``process(batch)``; a permanent error of one record is theirs to dead-letter (with the
reason) so that the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from tenacity import RetryCallState, wait_exponential

from streams import metrics
from streams.settings import KafkaSettings

from .topics import ensure_topics, make_producer

log = logging.getLogger(__name__)

Batch = dict[TopicPartition, list[ConsumerRecord]]


class PermanentError(Exception):
    """A record that can never be processed (it becomes a dead letter; retrying would not help)."""


PERMANENT = (PermanentError, ValueError, TypeError, KeyError)


def backoff_s(attempt: int, max_s: float) -> float:
    """The delay before retry number ``attempt`` (1, 2, ...): exponential from 0.5 s, capped."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(wait_exponential(multiplier=0.5, min=0.5, max=max_s)(state))


@dataclass
class ServiceStats:
    batches: int = 0
    retries: int = 0
    pauses: int = 0
    paused_s: float = 0.0


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: ConsumerService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        held = self.service._held
        if held:
            for tp in revoked:
                held.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        return None


class ConsumerService:
    """Poll → process → commit after the write; pause and keep polling while the write fails."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Sequence[str],
        group_id: str,
        *,
        max_records: int = 256,
        timeout_ms: int = 500,
        max_backoff_s: float = 30.0,
        max_poll_interval_ms: int = 300_000,
    ) -> None:
        self.kafka = kafka
        self.topic_names = list(topics)
        self.group_id = group_id
        self.max_records = max_records
        self.timeout_ms = timeout_ms
        self.max_backoff_s = max_backoff_s
        self.max_poll_interval_ms = max_poll_interval_ms
        self.service_stats = ServiceStats()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._held: Batch | None = None  # a batch waiting for the store, its partitions paused
        self._attempt = 0
        self._retry_at = 0.0
        self._paused_at = 0.0

    async def start(self) -> None:
        await ensure_topics(self.kafka)
        self._producer = make_producer(self.kafka, client_id=f"{self.group_id}-out")
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            group_id=self.group_id,
            client_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=self.max_poll_interval_ms,
        )
        self._consumer.subscribe(self.topic_names, listener=_Revocations(self))
        await self._consumer.start()
        log.info("%s started: group %s, topics %s", type(self).__name__, self.group_id, ", ".join(self.topic_names))

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def process(self, batch: Batch) -> None:
        raise NotImplementedError

    async def commit(self, batch: Batch) -> None:
        assert self._consumer is not None
        offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs}
        if offsets:
            await self._consumer.commit(offsets)

    @property
    def paused(self) -> bool:
        return self._held is not None

    async def run(
        self, stop: asyncio.Event | None = None, *, idle_exit_s: float | None = None, heartbeat: Path | None = None
    ) -> None:
        """Consume until ``stop`` is set (or, with ``idle_exit_s``, after that long without records)."""
        assert self._consumer is not None, "start() first"
        stop = stop or asyncio.Event()
        idle_since = time.monotonic()
        while not stop.is_set():
            if heartbeat is not None:
                heartbeat.touch()
            if self._held is not None:
                # paused: poll anyway (heartbeats, rebalances; paused partitions return nothing), retry when due
                await self._consumer.getmany(timeout_ms=min(self.timeout_ms, 200), max_records=1)
                if time.monotonic() >= self._retry_at:
                    await self._attempt_batch(self._held)
                idle_since = time.monotonic()
                continue
            batch = await self._consumer.getmany(timeout_ms=self.timeout_ms, max_records=self.max_records)
            if not batch:
                if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    log.info("%s idle for %.1f s: exiting", type(self).__name__, idle_exit_s)
                    break
                continue
            await self._attempt_batch(batch)
            idle_since = time.monotonic()

    async def _attempt_batch(self, batch: Batch) -> None:
        assert self._consumer is not None
        batch = {tp: recs for tp, recs in batch.items() if recs}
        if not batch:
            self._resume()
            return
        try:
            await self.process(batch)
            await self.commit(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - transient: hold the batch, pause, retry with backoff
            self._attempt += 1
            self.service_stats.retries += 1
            delay = backoff_s(self._attempt, self.max_backoff_s)
            if self._held is None:
                self.service_stats.pauses += 1
                self._paused_at = time.monotonic()
                self._consumer.pause(*self._consumer.assignment())
            self._held = batch
            self._retry_at = time.monotonic() + delay
            log.warning(
                "%s: a batch failed (%s: %s); partitions paused, still polling; retry %d in %.1f s",
                type(self).__name__,
                type(exc).__name__,
                exc,
                self._attempt,
                delay,
                exc_info=self._attempt == 1,
            )
            return
        self.service_stats.batches += 1
        self._observe_lag(batch)
        self._resume()

    def _observe_lag(self, batch: Batch) -> None:
        """Consumer lag per partition after a committed batch (the end offset minus what was written). A metric
        never stops the stream: partitions revoked meanwhile are skipped."""
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        for tp, recs in batch.items():
            if tp not in assigned:
                continue
            try:
                end = self._consumer.highwater(tp)
            except AssertionError:  # revoked between the check and the call
                continue
            if end is not None:
                metrics.set_consumer_lag(self.group_id, tp.topic, tp.partition, max(0, end - recs[-1].offset - 1))

    def _resume(self) -> None:
        if self._held is None:
            return
        assert self._consumer is not None
        self.service_stats.paused_s += time.monotonic() - self._paused_at
        self._held = None
        self._attempt = 0
        self._consumer.resume(*self._consumer.assignment())
        log.info("%s: the batch went through; partitions resumed", type(self).__name__)
