"""Compaction watermarks in a compacted Kafka topic (streaming mode), so any sink instance resumes them.

The topic ``settings.kafka.topics.watermarks`` holds one record per user (key: user id; value: a
``WatermarkRecord``; a tombstone when the user was erased). The store owner reads it as a
table at start (``load``); ``set``/``forget`` change the table in memory and queue the record, and
``flush`` produces the queued records and waits for Kafka's acknowledgement. The compaction agent flushes
after each user's run and before it commits the request, so a replaced sink (a new pod with an empty
``/data``) starts from the last watermarks instead of recompacting every user.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer

from schemas.records import WatermarkRecord
from streams.settings import KafkaSettings
from streams.sleep.changelog import Watermarks

from .topics import key_of, latest_by_key


class TopicWatermarks(Watermarks):
    """``Watermarks`` backed by a compacted topic instead of a local JSON file."""

    def __init__(self, kafka: KafkaSettings) -> None:  # noqa: D107 - no file: the topic is the state
        self.kafka = kafka
        self.path = Path("/dev/null")
        self._lock = threading.Lock()
        self._marks: dict[str, tuple[datetime | None, datetime]] = {}
        self._pending: dict[str, bytes | None] = {}

    @property
    def topic(self) -> str:
        return self.kafka.topics.watermarks

    async def load(self) -> int:
        """Read the topic into the table; returns the number of users with a watermark."""
        rows = await latest_by_key(self.kafka, self.topic)
        marks = {}
        for rec in rows.values():
            w = WatermarkRecord.model_validate_json(rec.value)
            marks[w.user_id] = (w.mark, w.completed_at)
        with self._lock:
            self._marks = marks
        return len(marks)

    def _save(self) -> None:
        """Nothing to write here: ``set``/``forget`` queue records and ``flush`` produces them."""

    def set(self, user_id: str, mark: datetime | None, completed_at: datetime) -> None:
        super().set(user_id, mark, completed_at)
        value = WatermarkRecord(user_id=user_id, mark=mark, completed_at=completed_at).model_dump_json().encode()
        with self._lock:
            self._pending[user_id] = value

    def forget(self, user_id: str) -> bool:
        found = super().forget(user_id)
        with self._lock:
            self._pending[user_id] = None  # a tombstone, even when this instance had not loaded the user
        return found

    async def flush(self, producer: AIOKafkaProducer) -> int:
        """Produce the queued changes and wait for their acknowledgement."""
        with self._lock:
            pending, self._pending = self._pending, {}
        futures = [await producer.send(self.topic, value=v, key=key_of(u)) for u, v in pending.items()]
        if futures:
            await asyncio.gather(*futures)
        return len(futures)
