"""Producing to the pipeline: turns → the raw-turn topic (key = user id, value = RawTurn JSON).

The producer is idempotent (``enable_idempotence=True``, ``acks=all``): a retried send after a lost
acknowledgement is not written twice, and one user's turns keep their order in their partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaProducer

from schemas.records import RawTurn, Record
from streams.kafka.topics import dumps, ensure_topics, key_of
from streams.settings import KafkaSettings

WINDOW = 500  # sends in flight before waiting for their acknowledgements


def make_producer(kafka: KafkaSettings, *, client_id: str | None = None) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=client_id or f"{kafka.app_id}-producer",
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
    )


async def produce_raw(
    kafka: KafkaSettings,
    topic: str,
    items: Iterable[tuple[bytes | None, bytes | None]],
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send (key, value) byte pairs to a topic in order; returns how many were acknowledged."""
    producer = make_producer(kafka)
    await producer.start()
    sent = 0
    try:
        pending: list[asyncio.Future] = []

        async def drain() -> None:
            nonlocal sent
            if pending:
                await asyncio.gather(*pending)
                sent += len(pending)
                if progress is not None:
                    progress(len(pending))
                pending.clear()

        for key, value in items:
            pending.append(await producer.send(topic, value=value, key=key))
            if len(pending) >= WINDOW:
                await drain()
        await drain()
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def produce_records(
    kafka: KafkaSettings,
    topic: str,
    records: Iterable[Record],
    key: Callable[[Record], str | None],
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    return await produce_raw(kafka, topic, ((key_of(key(r)), dumps(r)) for r in records), progress=progress)


async def produce_turns(
    kafka: KafkaSettings,
    turns: Iterable[RawTurn],
    *,
    progress: Callable[[int], None] | None = None,
    create_topics: bool = True,
) -> int:
    """Send turns to the raw-turn topic keyed by user id, in the given order (creates the topics first)."""
    if create_topics:
        await ensure_topics(kafka)
    return await produce_records(
        kafka,
        kafka.topics.raw_turns,
        turns,
        key=lambda r: r.user_id,  # type: ignore[attr-defined]
        progress=progress,
    )
