"""``lightmem serve --kafka``: the API process is also the LTM sink and the compaction agent.

It owns the store (through its ``Memory``) and lends it to the sink and the agent, so reads are live while the
stream writes. ``POST /v1/turns`` produces to the raw-turn topic (keyed by the scoped user id, idempotent producer,
acknowledged before the 202); erasure goes to the control topic and compaction to the requests topic. Workers stay
separate processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from schemas import ControlRecord, RawTurn
from streams.api import Memory
from streams.kafka.produce import make_producer
from streams.kafka.topics import broker_available, dumps, ensure_topics, key_of
from streams.settings import Settings
from streams.sleep.kafka_agent import produce_erasure, produce_requests, run_store_owner

log = logging.getLogger(__name__)


class KafkaSide:
    """The producer for turns and the store owner's sink + compaction agent, run beside the API."""

    def __init__(self, settings: Settings, memory: Memory) -> None:
        self.settings = settings
        self.memory = memory
        self._producer: AIOKafkaProducer | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[object] | None = None

    async def start(self) -> None:
        await ensure_topics(self.settings.kafka)
        self._producer = make_producer(self.settings.kafka, client_id=f"{self.settings.kafka.app_id}-api")
        await self._producer.start()
        pipeline = self.memory.pipeline
        owned = (pipeline.store, pipeline.stages.embed)
        self._task = asyncio.create_task(run_store_owner(self.settings, stop=self._stop, owned=owned))
        self._task.add_done_callback(_log_end)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def produce(self, turns: Sequence[RawTurn]) -> None:
        assert self._producer is not None, "start() first"
        topic = self.settings.kafka.topics.raw_turns
        futures = [await self._producer.send(topic, value=dumps(t), key=key_of(t.user_id)) for t in turns]
        await asyncio.gather(*futures)

    async def erase(self, user_id: str) -> ControlRecord:
        return await produce_erasure(self.settings, user_id)

    async def compact(self, users: Sequence[str]) -> list[str]:
        return [r.user_id for r in await produce_requests(self.settings, users)]

    async def broker_ok(self) -> bool:
        return await broker_available(self.settings.kafka.bootstrap_servers, timeout_s=2.0)


def _log_end(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the LTM sink and compaction agent stopped: %r", task.exception())
