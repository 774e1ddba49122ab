"""Erasure of one user over Kafka: one barrier through the pipeline, then purges.

``produce_erasure(settings, user)`` writes one ``ControlRecord`` ``erase_user`` to

- the **raw-turn topic**, keyed by the user: the *barrier*. It is ordered with the user's turns (one
  partition), and every stage passes it on in order: the worker's sensory agent drops the user's sensory row
  (a changelog tombstone) and forwards it to the segments topic; the STM agent drops the STM row and forwards
  it to the summaries topic; the LTM sink, reading it in order with the user's summaries, deletes the user's
  memories (every summary before the barrier derives from turns produced before the erasure and was written
  before it; every summary after it derives from turns produced after it), purges the user's memory changes
  and dead letters (``purge_user``: tombstones on their per-record keys). A summary or memory change of the
  user computed before the erasure and arriving after it is dropped (the erasure epoch, ``ErasureEpochs``:
  read from the control topic, so a restarted or another sink instance knows it too).
  Replay (``streams.kafka.replay``) drops every turn of the user before the barrier: replay after an
  erasure never brings the user back.
- the **control topic** (compacted, latest command per user): read by the compaction agent (watermark) and by
  every sink instance (the erasure epochs).

The raw-turn log is append-only and kept forever: the user's turns stay in it, but sealed with their key
(``streams.kafka.keys``), which the erasure tombstones first, so they can no longer be read (crypto-shredding).
What stays readable: the segments and summaries topics keep derived texts until their retention (7 and 30 days)
deletes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from schemas.records import ControlRecord
from streams.settings import KafkaSettings, Settings

from .topics import (
    TopicReader,
    dumps,
    ensure_topics,
    key_of,
    latest_by_key,
    make_producer,
    partition_for,
    user_of_record_key,
)

log = logging.getLogger(__name__)


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


class ErasureEpochs:
    """The erasure epoch of every user (the time of their latest erasure), durable and shared.

    Read from the control topic, which keeps every erasure (compacted: the latest command per user), with a
    group-less reader that stays open: ``start`` reads the topic to its end, so a restarted or a new sink
    instance knows every erasure made before it started; ``refresh`` reads what was appended since (the sink
    calls it before each batch, so an erasure acknowledged by ``lightmem forget`` before a batch is processed
    applies to it, whichever instance processed the in-band barrier). ``note`` records an erasure seen in-band.
    A record of the user carrying a time at or before their epoch (a summary's ``created_at``, a change's
    ``at``) was computed before the erasure and must not be written.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.erased: dict[str, datetime] = {}  # never rebound: the compaction agent shares this dict
        self._reader = TopicReader(kafka, kafka.topics.control, client_id=f"{kafka.app_id}-erasure-epochs")
        self._started = False

    async def start(self) -> int:
        """Read every erasure recorded so far; returns the number of users with an epoch."""
        await self._reader.start()
        self._started = True
        await self.refresh()
        return len(self.erased)

    async def stop(self) -> None:
        await self._reader.stop()
        self._started = False

    async def refresh(self, timeout_s: float = 30.0) -> int:
        """Read the erasures appended to the control topic since the last call; returns how many were read."""
        if not self._started:
            return 0
        n = 0
        async for batch in self._reader.batches(timeout_s=timeout_s):
            for rec in batch:
                if rec.value is None:
                    continue  # a tombstone clears a command, never an erasure already done
                try:
                    cmd = ControlRecord.model_validate_json(rec.value)
                except ValidationError as exc:  # the compaction agent dead-letters it with the reason
                    log.warning("invalid control record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
                    continue
                self.note(cmd)
                n += 1
        return n

    def note(self, cmd: ControlRecord) -> None:
        if cmd.action != "erase_user":
            return
        prev = self.erased.get(cmd.user_id)
        self.erased[cmd.user_id] = max(prev, cmd.requested_at) if prev else cmd.requested_at

    def before_erasure(self, user_id: str, at: datetime) -> bool:
        """True when a record of ``user_id`` made at ``at`` predates the user's latest erasure."""
        epoch = self.erased.get(user_id)
        return epoch is not None and at <= epoch
