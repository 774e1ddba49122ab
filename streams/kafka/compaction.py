"""The sleep-time update over Kafka: nightly requests, the compaction agent, and the store owner's process.

Flow (topics from ``settings.kafka.topics``, all keyed by user id)::

    nightly crontab (Faust worker) ─┐
    lightmem compact --kafka ───────┴─► compaction.requests ─► CompactionAgent ─► memory.changes ─► LTM sink
                                                                (store owner)                      (applies)

- **Requests** (``streams.sleep.schedule``): ``request_id`` is a uuid5 of the user and the slot (the nightly
  run's scheduled time, or ``manual:<time>``), so a crontab firing twice for one night asks once; the agent skips
  a request id it has already handled.
- **Nightly crontab** (``install_crontab(shell)``, one line in the Faust app): at ``sleep.cron_time`` in
  ``sleep.timezone`` every worker emits one request per user of ITS partitions whose last turn came after the
  previous scheduled run less the STM idle timeout.
- **CompactionAgent** (a ``ConsumerService``: commit after the work, pause on store errors) consumes the requests
  (group ``<app_id>-compaction``) in the process that owns the store — the LTM sink's
  (``run_sink_with_compaction``). Per request: ``Compactor.compact_user`` (the same code as embedded), whose
  changes are produced to the memory-changes topic (key ``<user>/<change id>``) and acknowledged before the
  user's watermark moves; watermarks live in a compacted topic (``streams.kafka.watermarks``), so a replaced sink
  resumes them; decision dead letters go to the dead-letter topic; the request's offset is committed after that.
- **Erasure** (``streams.kafka.erasure``): on the control topic the agent forgets the user's watermark, deletes
  their memories created before the command and tombstones their changes and dead letters; the in-band barrier
  does the same at the sink in order with the user's summaries.

One store, two users of it in one process: the sink writes from its worker thread while the agent reads on the
event loop, so both get the same ``LockedStore`` that serialises every call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from aiokafka.structs import ConsumerRecord

from schemas.records import CompactionRequest, ControlRecord, DeadLetter, MemoryChange
from streams import metrics
from streams.cost import CostLedger
from streams.encoder import load_encoder
from streams.ltm import MemoryStore, open_store
from streams.memories import EmbeddingCache
from streams.settings import Settings
from streams.sleep.apply import change_hook
from streams.sleep.compact import Compactor
from streams.sleep.decide import Decider
from streams.sleep.schedule import active_users, compaction_request, cron_format, last_slot

from .codec import decode
from .consumer import Batch, ConsumerService
from .erasure import produce_erasure, purge_user
from .sink import LTMSink, SinkStats
from .topics import (
    dumps,
    ensure_topics,
    key_of,
    keyed_send,
    make_producer,
    spec_of,
)
from .watermarks import TopicWatermarks

log = logging.getLogger(__name__)

SEEN_REQUESTS = 10_000  # request ids remembered by an agent (duplicate-fire guard)

__all__ = [
    "AgentStats",
    "CompactionAgent",
    "LockedStore",
    "compaction_group_id",
    "install_crontab",
    "produce_erasure",
    "produce_requests",
    "run_sink_with_compaction",
    "run_store_owner",
]


async def produce_requests(
    settings: Settings, users: Sequence[str], slot: str | None = None
) -> list[CompactionRequest]:
    """``lightmem compact --kafka``: one request per user onto the compaction topic, acknowledged."""
    now = datetime.now(UTC)
    slot = slot or f"manual:{now.isoformat()}"
    requests = [compaction_request(u, slot, now) for u in users]
    await ensure_topics(settings.kafka)
    producer = make_producer(settings.kafka, client_id=f"{settings.kafka.app_id}-compact-cli")
    await producer.start()
    try:
        topic = settings.kafka.topics.compaction_requests
        futures = [await producer.send(topic, value=dumps(r), key=key_of(r.user_id)) for r in requests]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return requests


# -- nightly crontab in the Faust worker -------------------------------------------------------------------


def install_crontab(shell: Any) -> None:
    """Register the nightly request emitter on a ``streams.kafka.app.Shell`` (call it once, after its agents)."""
    settings: Settings = shell.settings
    sleep = settings.sleep
    app = shell.app
    topic = app.topic(
        settings.kafka.topics.compaction_requests,
        partitions=settings.kafka.partitions,
        key_serializer="raw",
        value_serializer="raw",
    )

    async def nightly() -> list[CompactionRequest]:
        now = datetime.now(UTC)
        slot = last_slot(now, sleep)
        # active since the previous scheduled run, less the STM idle timeout: a user who went quiet just before
        # it may have had memories written after it
        since = (slot - timedelta(days=1)).timestamp() - settings.stm.idle_timeout_s
        seen = shell.last_seen()  # this worker's partitions only
        requests = [compaction_request(u, f"nightly:{slot.isoformat()}", now) for u in active_users(seen, since)]
        futures = [await topic.send(key=r.user_id.encode(), value=dumps(r)) for r in requests]
        if futures:
            await asyncio.gather(*futures)
        log.info("nightly sleep-time update: %d compaction request(s) for slot %s", len(requests), slot.isoformat())
        return requests

    shell.nightly_compaction = nightly  # callable directly (tests, operators)
    app.crontab(cron_format(sleep), timezone=ZoneInfo(sleep.timezone))(nightly)


# -- one store shared by the sink and the agent -------------------------------------------------------------


class LockedStore:
    """A ``MemoryStore`` whose every call holds one lock (the sink's writer thread and the agent's reads)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


# -- the compaction agent ------------------------------------------------------------------------------------


def compaction_group_id(settings: Settings) -> str:
    return f"{settings.kafka.app_id}-compaction"


class _Buffered:
    """Collects dead letters (the Compactor sends synchronously); the agent produces them after each user."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def send(self, record: DeadLetter) -> None:
        self.letters.append(record)


def _no_embed(texts: Sequence[str]) -> np.ndarray:
    raise RuntimeError("the compaction agent does not apply changes; the LTM sink does")


@dataclass
class AgentStats:
    requests: int = 0
    duplicates: int = 0
    users: int = 0
    changes: int = 0
    dead_letters: int = 0
    erased: int = 0


class CompactionAgent(ConsumerService):
    """Consumes compaction requests and erasures and produces memory changes (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: MemoryStore,
        *,
        decider: Decider | None = None,
        group_id: str | None = None,
        max_records: int = 16,
        timeout_ms: int = 500,
    ) -> None:
        kafka = settings.kafka
        super().__init__(
            kafka,
            [kafka.topics.compaction_requests, kafka.topics.control],
            group_id or compaction_group_id(settings),
            max_records=max_records,
            timeout_ms=timeout_ms,
            max_poll_interval_ms=30 * 60 * 1000,  # one user's run may take minutes of LLM calls
        )
        self.settings = settings
        self.store = store
        self.stats = AgentStats()
        self.ledger = CostLedger()
        self._dead = _Buffered()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.erased: dict[str, datetime] = {}  # shared with the sink in one store owner (the erasure epoch)
        self.watermarks = TopicWatermarks(kafka)
        self.compactor = Compactor(
            settings,
            store,
            _no_embed,
            watermarks=self.watermarks,
            dead_letters=self._dead,
            decider=decider,
            emit=self._produce_changes,
        )

    async def start(self) -> None:
        await super().start()
        n = await self.watermarks.load()
        log.info("compaction agent: model %s, %d watermarks loaded from the topic", self.compactor.model, n)

    async def stop(self) -> None:
        await super().stop()
        await self.compactor.aclose()

    async def run(  # type: ignore[override]
        self, stop: asyncio.Event | None = None, *, idle_exit_s: float | None = None, heartbeat: Path | None = None
    ) -> AgentStats:
        await super().run(stop, idle_exit_s=idle_exit_s, heartbeat=heartbeat)
        return self.stats

    async def _send_keyed(self, topic: str, items: Sequence[tuple[dict[str, Any], bytes]]) -> None:
        assert self._producer is not None
        futures = [await self._producer.send(topic, value=v, **kw) for kw, v in items]
        if futures:
            await asyncio.gather(*futures)

    async def _produce_changes(self, changes: Sequence[MemoryChange]) -> None:
        n = self.kafka.partitions
        await self._send_keyed(
            self.kafka.topics.memory_changes, [(keyed_send(c.user_id, c.change_id, n), dumps(c)) for c in changes]
        )
        self.stats.changes += len(changes)

    async def _flush_dead(self) -> None:
        letters, self._dead.letters = self._dead.letters, []
        if letters:
            for d in letters:
                metrics.observe_dead_letter(d)
            n = self.kafka.partitions
            await self._send_keyed(
                self.kafka.topics.dead_letters, [(keyed_send(d.key, d.dlq_id, n), dumps(d)) for d in letters]
            )
            self.stats.dead_letters += len(letters)

    async def _control(self, rec: ConsumerRecord) -> None:
        """``erase_user``: the user's memories written before the command, their watermark, their changes and
        dead letters are removed.

        Only memories created at or before ``requested_at`` go, so a control topic replayed later (it is compacted:
        the last command per user stays) never erases what a returning user said afterwards.
        """
        if rec.value is None:
            return  # a tombstone: the command was cleared
        cmd = decode(spec_of(self.kafka, "control"), rec, "control")
        if isinstance(cmd, DeadLetter):
            self._dead.send(cmd)
            return
        assert isinstance(cmd, ControlRecord)
        doomed = [r.memory_id for r in self.store.get_all(cmd.user_id) if r.created_at <= cmd.requested_at]
        if doomed:
            self.store.delete(cmd.user_id, doomed)
        self.watermarks.forget(cmd.user_id)
        assert self._producer is not None
        await self.watermarks.flush(self._producer)
        prev = self.erased.get(cmd.user_id)
        self.erased[cmd.user_id] = max(prev, cmd.requested_at) if prev else cmd.requested_at
        await purge_user(self.kafka, cmd.user_id)  # the user's memory changes and dead letters
        self.stats.erased += 1
        log.info("erased user %s: %d memories (control record of %s)", cmd.user_id, len(doomed), cmd.requested_at)

    async def process(self, batch: Batch) -> None:
        """Handle a batch of requests (one user at a time, in order); the base commits it afterwards."""
        assert self._producer is not None
        for records in batch.values():
            for rec in records:
                if rec.topic == self.kafka.topics.control:
                    await self._control(rec)
                    continue
                self.stats.requests += 1
                req = decode(spec_of(self.kafka, "compaction_requests"), rec, "compact")
                if isinstance(req, DeadLetter):
                    self._dead.send(req)
                    continue
                assert isinstance(req, CompactionRequest)
                if req.request_id in self._seen:
                    self.stats.duplicates += 1
                    continue
                run = await self.compactor.compact_user(req.user_id)
                self.ledger.record(run.cost)
                self.stats.users += 1
                await self.watermarks.flush(self._producer)  # before the request's offset is committed
                await self._flush_dead()
                self._seen[req.request_id] = None
                while len(self._seen) > SEEN_REQUESTS:
                    self._seen.popitem(last=False)
                log.info(
                    "compacted %s (request %s): %d new, %d changes %s",
                    req.user_id,
                    req.request_id,
                    run.targets,
                    len(run.changes),
                    dict(run.actions),
                )
        await self._flush_dead()


# -- the store owner's process: sink + agent ----------------------------------------------------------------


async def run_store_owner(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    idle_exit_s: float | None = None,
    max_records: int = 256,
    timeout_ms: int = 500,
    heartbeat: Path | None = None,
    decider: Decider | None = None,
    owned: tuple[MemoryStore, Any] | None = None,
) -> tuple[SinkStats, AgentStats]:
    """The LTM sink (applying memory changes with ``change_hook``) and the compaction agent over ONE store.

    Both stop on ``stop``; when one of them ends (``idle_exit_s``, an error) the other is stopped too.
    ``owned``: (store, embed) already opened by this process (``lightmem serve --kafka``: its ``Memory``'s), used
    and left open; by default the encoder and the store are opened here and closed at the end.
    """
    if owned is None:
        encoder = load_encoder(settings.embedding)
        raw_store = open_store(settings.store, encoder.dim)
        embed = EmbeddingCache(encoder.embed, encoder.dim)
    else:
        raw_store, embed = owned
    store: Any = LockedStore(raw_store)
    sink = LTMSink(
        settings, store, embed, apply_changes=change_hook(embed), max_records=max_records, timeout_ms=timeout_ms
    )
    agent = CompactionAgent(settings, store, decider=decider)
    agent.erased = sink.erased  # an erasure either of them sees drops older changes at the sink
    stop = stop or asyncio.Event()
    try:
        await sink.start()
        await agent.start()
        sink_task = asyncio.create_task(sink.run(stop, idle_exit_s=idle_exit_s, heartbeat=heartbeat))
        agent_task = asyncio.create_task(agent.run(stop, idle_exit_s=idle_exit_s))
        tasks: list[asyncio.Task[Any]] = [sink_task, agent_task]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            await asyncio.wait(tasks)
        sink_stats, agent_stats = sink_task.result(), agent_task.result()
        log.info("compaction agent stopped: %s", agent_stats)
        return sink_stats, agent_stats
    finally:
        await agent.stop()
        await sink.stop()
        if owned is None:
            raw_store.close()


async def run_sink_with_compaction(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    idle_exit_s: float | None = None,
    max_records: int = 256,
    timeout_ms: int = 500,
    heartbeat: Path | None = None,
) -> SinkStats:
    """Drop-in for ``streams.kafka.sink.run_sink``: the sink and the compaction agent; returns the sink's stats."""
    sink_stats, _ = await run_store_owner(
        settings,
        stop=stop,
        idle_exit_s=idle_exit_s,
        max_records=max_records,
        timeout_ms=timeout_ms,
        heartbeat=heartbeat,
    )
    return sink_stats
