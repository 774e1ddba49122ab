"""Producing to the pipeline: turns → the raw-turn topic (key = user id, value = RawTurn JSON).

The producer is idempotent (``enable_idempotence=True``, ``acks=all``): a retried send after a lost
acknowledgement is not written twice, and one user's turns keep their order in their partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from schemas.records import RawTurn, Record
from streams.kafka.keys import KeyRing, seal
from streams.kafka.topics import dumps, ensure_topics, key_of, make_producer
from streams.settings import KafkaSettings

WINDOW = 500  # sends in flight before waiting for their acknowledgements


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
    """Send turns to the raw-turn topic keyed by user id, in the given order (creates the topics first).

    With ``kafka.seal_turns`` each turn's content is encrypted with its user's key (``streams.kafka.keys``).
    """
    if create_topics:
        await ensure_topics(kafka)
    if not kafka.seal_turns:
        return await produce_records(
            kafka,
            kafka.topics.raw_turns,
            turns,
            key=lambda r: r.user_id,  # type: ignore[attr-defined]
            progress=progress,
        )
    producer = make_producer(kafka)
    await producer.start()
    keys = KeyRing(kafka)
    sent = 0
    try:
        pending: list[asyncio.Future] = []
        for turn in turns:
            key_id, fernet = await keys.key_for(turn.user_id, producer)
            value = dumps(seal(turn, key_id, fernet))
            pending.append(await producer.send(kafka.topics.raw_turns, value=value, key=key_of(turn.user_id)))
            if len(pending) >= WINDOW:
                await asyncio.gather(*pending)
                sent += len(pending)
                if progress is not None:
                    progress(len(pending))
                pending.clear()
        await asyncio.gather(*pending)
        sent += len(pending)
        if progress is not None and pending:
            progress(len(pending))
    finally:
        await producer.stop()
    return sent


__all__ = ["make_producer", "produce_raw", "produce_records", "produce_turns"]
