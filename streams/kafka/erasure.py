"""Erasure of one user over Kafka: one barrier through the pipeline, then purges.

``produce_erasure(settings, user)`` writes one ``ControlRecord`` ``erase_user`` to

- the **raw-turn topic**, keyed by the user: the *barrier*. It is ordered with the user's turns (one
  partition), and every stage passes it on in order: the worker's sensory agent drops the user's sensory row
  (a changelog tombstone) and forwards it to the segments topic; the STM agent drops the STM row and forwards
  it to the summaries topic; the LTM sink, reading it in order with the user's summaries, deletes the user's
  memories (every summary before the barrier derives from turns produced before the erasure and was written
  before it; every summary after it derives from turns produced after it), purges the user's memory changes
  and dead letters (``purge_user``: tombstones on their per-record keys) and remembers the erasure time, so
  a memory change computed before the erasure and arriving after it is dropped (the erasure epoch).
  Replay (``streams.kafka.replay``) drops every turn of the user before the barrier: replay after an
  erasure never brings the user back.
- the **control topic** (compacted, latest command per user): read by the compaction agent (watermark).

The raw-turn log is append-only and kept forever: the user's turns stay in it, but sealed with their key
(``streams.kafka.keys``), which the erasure tombstones first, so they can no longer be read (crypto-shredding).
What stays readable: the segments and summaries topics keep derived texts until their retention (7 and 30 days)
deletes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.records import ControlRecord
from streams.settings import KafkaSettings, Settings

from .topics import (
    assign_and_refresh,
    dumps,
    ensure_topics,
    key_of,
    make_producer,
    partition_for,
    partitions_of,
    stable_end_offsets,
    user_of_record_key,
)


async def produce_erasure(settings: Settings, user_id: str) -> ControlRecord:
    """``lightmem forget --kafka``: shred the user's keys, then the erasure barrier into the raw-turn topic and
    the control topic."""
    record = ControlRecord(action="erase_user", user_id=user_id, requested_at=datetime.now(UTC))
    kafka = settings.kafka
    await ensure_topics(kafka)
    await purge_user(kafka, user_id, [kafka.topics.keys])  # crypto-shredding: their sealed turns are unreadable
    producer = make_producer(kafka, client_id=f"{kafka.app_id}-forget")
    await producer.start()
    try:
        value, key = dumps(record), key_of(user_id)
        futures = [
            await producer.send(kafka.topics.raw_turns, value=value, key=key),
            await producer.send(kafka.topics.control, value=value, key=key),
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return record


async def latest_by_key(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> dict[bytes, Any]:
    """The latest record per key of a topic (a compacted topic read as a table; tombstones remove keys)."""
    n = (await partitions_of(kafka, [topic])).get(topic, 0)
    if not n:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(n)]
        await assign_and_refresh(consumer, tps)
        end = await stable_end_offsets(consumer, tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[bytes, Any] = {}
        remaining = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, recs in batch.items():
                for r in recs:
                    if r.offset >= end[tp] or r.key is None:
                        continue
                    if r.value is None:
                        out.pop(r.key, None)
                    else:
                        out[r.key] = r
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        if remaining:
            raise TimeoutError(f"could not read {topic} to its end within {timeout_s} s")
        return out
    finally:
        await consumer.stop()


async def user_records(kafka: KafkaSettings, topic: str, user_id: str) -> list[Any]:
    """The live records of a user on a purgeable topic (key ``<user>/<id>``)."""
    return [r for k, r in (await latest_by_key(kafka, topic)).items() if user_of_record_key(k) == user_id]


async def purge_user(kafka: KafkaSettings, user_id: str, topics: Iterable[str] | None = None) -> int:
    """Tombstone every record of the user on the purgeable topics (memory changes, dead letters)."""
    names = list(topics) if topics is not None else [kafka.topics.memory_changes, kafka.topics.dead_letters]
    doomed: list[tuple[str, bytes, int]] = []
    for topic in names:
        for r in await user_records(kafka, topic, user_id):
            doomed.append((topic, r.key, r.partition))
    if not doomed:
        return 0
    producer = make_producer(kafka, client_id=f"{kafka.app_id}-purge")
    await producer.start()
    try:
        futures = [await producer.send(t, value=None, key=k, partition=p) for t, k, p in doomed]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(doomed)


def user_partition(kafka: KafkaSettings, user_id: str) -> int:
    return partition_for(user_id.encode("utf-8"), kafka.partitions)
