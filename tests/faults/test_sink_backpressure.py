"""The sink under store faults (real broker, real encoder, the embedded store behind a switch):

- the store refuses writes for longer than the consumer's ``max_poll_interval_ms``: the sink pauses its
  partitions, keeps polling, stays in its group, and writes everything once the store answers again;
- one summary whose write fails permanently (a ``ValueError``) becomes a dead letter with the reason; the
  others are written and the stream goes on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from streams.kafka.produce import produce_records
from streams.kafka.sink import LTMSink
from streams.kafka.topics import ensure_topics, group_members
from streams.ltm import open_store
from streams.memories import EmbeddingCache, summary_to_memories
from tests.conftest_kafka import KafkaEnv
from tests.faults.common import summary

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(300)]


class SwitchedStore:
    """The real store; ``down`` makes every write fail as a dead server would; user "poison" is a bad record."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = False
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def upsert(self, records: Any, vectors: Any) -> None:
        if self.down:
            self.refused += 1
            raise ConnectionError("store unavailable")
        if any(r.user_id == "poison" for r in records):
            raise ValueError("payload rejected by the store")
        self._store.upsert(records, vectors)


def test_sink_pauses_through_an_outage_and_dead_letters_a_bad_record(kafka_env: KafkaEnv, encoder: Any) -> None:
    env = kafka_env
    k = env.settings.kafka
    good = [summary(u, n) for u in ("ann", "bob") for n in range(6)]
    bad = summary("poison", 0)
    store = SwitchedStore(open_store(env.settings.store, encoder.dim))
    expected = {m.memory_id for s in good for m in summary_to_memories(s, env.settings.pipeline_version)}
    assert len(expected) >= len(good)

    async def main() -> tuple[int, int, Any]:
        await ensure_topics(k)
        sink = LTMSink(env.settings, store, EmbeddingCache(encoder.embed, encoder.dim), max_backoff_s=2.0)
        sink.max_poll_interval_ms = 8000  # an outage longer than this would evict a sink that stopped polling
        await sink.start()
        stop = asyncio.Event()
        task = asyncio.create_task(sink.run(stop))
        try:
            store.down = True
            await produce_records(k, k.topics.summaries, good[:6], key=lambda s: s.user_id)
            await asyncio.sleep(14)  # > max_poll_interval_ms with the store down
            members = await group_members(k, sink.group_id)
            assert sink.paused and store.refused >= 3
            store.down = False
            await produce_records(k, k.topics.summaries, [bad, *good[6:]], key=lambda s: s.user_id)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (sink.paused or store.count() < len(expected)):
                await asyncio.sleep(0.5)
            return members, store.count(), sink.service_stats
        finally:
            stop.set()
            await task
            await sink.stop()

    try:
        members, count, stats = asyncio.run(main())
        got = {m.memory_id for u in ("ann", "bob") for m in store.get_all(u)}
        assert store.get_all("poison") == []
    finally:
        store.close()
    assert members == 1, "the sink left its group during the outage"
    assert stats.pauses >= 1 and stats.paused_s > 8
    assert got == expected and count == len(expected)
    letters = [d for d in env.dead_letters() if d.key == "poison"]
    assert len(letters) == 1 and "payload rejected by the store" in letters[0].reason
    assert letters[0].stage == "sink" and letters[0].error_type == "ValueError"
