"""The sleep-time update over Kafka: nightly requests, the compaction agent, and the sink's apply hook.

Flow (topics from ``settings.kafka.topics``, all keyed by user id)::

    nightly crontab (Faust worker) ─┐
    lightmem compact --kafka ───────┴─► compaction.requests ─► CompactionAgent ─► memory.changes ─► LTM sink
                                                                (store owner)                      (applies)

- **Requests.** ``compaction_request(user, slot)`` — ``request_id`` is a uuid5 of the user and the slot (the
  nightly run's scheduled time, or ``manual:<time>``), so a crontab firing twice for one night (two workers,
  a restart) asks once; the agent skips a request id it has already handled. ``watermark`` is left None: the
  agent owns the watermarks.
- **Nightly crontab** (``install_crontab(shell)``, one line in the Faust app): at ``sleep.cron_time`` in
  ``sleep.timezone`` every worker emits one request per user of ITS partitions whose last turn came after the
  previous scheduled run less the STM idle timeout (the sensory table's ``seen_at``) — the users who may have
  memories newer than their watermark; a request for a user with nothing new costs a payload scan, no LLM call.
- **CompactionAgent** consumes the requests (consumer group ``<app_id>-compaction``, manual commits) in the
  process that owns the store — the LTM sink's (``run_sink_with_compaction``, a drop-in for ``run_sink``), since
  the embedded engine has one owner and workers never open Qdrant. Per request: ``Compactor.compact_user`` (the
  same code as embedded), whose changes are produced to the memory-changes topic and acknowledged by Kafka before
  the user's watermark moves (a local file under ``settings.data_dir``, as embedded); decision dead letters go to
  the dead-letter topic; the request's offset is committed after that. A crash re-delivers the request: the user
  is redone, with the same change ids, and the sink's version-guarded apply makes a repeated change harmless.
- **Apply**: the sink gets ``apply_changes=change_hook(embed)`` — the same ``streams.sleep.apply`` as embedded:
  updates re-embedded, deletes removed with the old record kept in the change, guarded by versions.

- **Erasure** (``produce_erasure``, ``lightmem forget --kafka``): a ``ControlRecord`` ``erase_user`` on the control
  topic; the agent (store owner) deletes the user's memories created before the command and their watermark.
  The workers' buffered state is the worker's to drop; the memory-changes and dead-letter topics keep records
  forever by configuration, so old texts of an erased user remain there (see the report on that).

One store, two users of it in one process: the sink writes from its worker thread while the agent reads on the
event loop, so both get the same ``LockedStore`` that serialises every call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from schemas.records import CompactionRequest, ControlRecord, DeadLetter, MemoryChange
from streams import ids
from streams.cost import CostLedger
from streams.ltm import MemoryStore
from streams.settings import Settings, SleepSettings
from streams.sleep.changelog import Watermarks
from streams.sleep.compact import Compactor
from streams.sleep.decide import Decider

log = logging.getLogger(__name__)

SEEN_REQUESTS = 10_000  # request ids remembered by an agent (duplicate-fire guard)


# -- requests ----------------------------------------------------------------------------------------------


def cron_format(sleep: SleepSettings) -> str:
    """``"HH:MM"`` → the daily cron spec ``"MM HH * * *"``."""
    hour, minute = (int(x) for x in sleep.cron_time.split(":"))
    return f"{minute} {hour} * * *"


def last_slot(now: datetime, sleep: SleepSettings) -> datetime:
    """The most recent scheduled nightly time at or before ``now`` (aware, in the configured timezone)."""
    tz = ZoneInfo(sleep.timezone)
    hour, minute = (int(x) for x in sleep.cron_time.split(":"))
    local = now.astimezone(tz)
    slot = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if slot > local:
        slot = (slot - timedelta(days=1)).replace(hour=hour, minute=minute)
    return slot


def compaction_request(user_id: str, slot: str, now: datetime | None = None) -> CompactionRequest:
    return CompactionRequest(
        request_id=ids.derived_id("compaction_request", user_id, slot),
        user_id=user_id,
        watermark=None,
        requested_at=now or datetime.now(UTC),
    )


def active_users(seen_at: Mapping[str, float], since_s: float) -> list[str]:
    """Users whose last turn (epoch seconds) came after ``since_s``."""
    return sorted(u for u, t in seen_at.items() if t > since_s)


async def produce_requests(
    settings: Settings, users: Sequence[str], slot: str | None = None
) -> list[CompactionRequest]:
    """``lightmem compact --kafka``: one request per user onto the compaction topic, acknowledged."""
    from streams.kafka.produce import make_producer
    from streams.kafka.topics import dumps, ensure_topics, key_of

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


async def produce_erasure(settings: Settings, user_id: str) -> ControlRecord:
    """``lightmem forget --kafka``: an ``erase_user`` command on the control topic (keyed by the user)."""
    from streams.kafka.produce import make_producer
    from streams.kafka.topics import dumps, ensure_topics, key_of

    record = ControlRecord(action="erase_user", user_id=user_id, requested_at=datetime.now(UTC))
    await ensure_topics(settings.kafka)
    producer = make_producer(settings.kafka, client_id=f"{settings.kafka.app_id}-forget-cli")
    await producer.start()
    try:
        await (await producer.send(settings.kafka.topics.control, value=dumps(record), key=key_of(user_id)))
    finally:
        await producer.stop()
    return record


# -- nightly crontab in the Faust worker -------------------------------------------------------------------


def install_crontab(shell: Any) -> None:
    """Register the nightly request emitter on a ``streams.kafka.app.Shell`` (call it once, after its agents)."""
    from streams.kafka.app import SensoryRow
    from streams.kafka.topics import dumps

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
        seen = {}
        for key in shell._user_keys(shell.sensory_table):  # this worker's partitions only
            user = key.decode()
            seen[user] = SensoryRow.load(shell.sensory_table.get(key), user).seen_at
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


class CompactionAgent:
    """Consumes compaction requests and produces memory changes (see the module docstring)."""

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
        self.settings = settings
        self.kafka = settings.kafka
        self.store = store
        self.group_id = group_id or compaction_group_id(settings)
        self.max_records = max_records
        self.timeout_ms = timeout_ms
        self.stats = AgentStats()
        self.ledger = CostLedger()
        self._dead = _Buffered()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.compactor = Compactor(
            settings,
            store,
            _no_embed,
            watermarks=Watermarks.in_dir(settings.data_dir),
            dead_letters=self._dead,
            decider=decider,
            emit=self._produce_changes,
        )

    async def start(self) -> None:
        from streams.kafka.produce import make_producer
        from streams.kafka.topics import ensure_topics

        await ensure_topics(self.kafka)
        self._producer = make_producer(self.kafka, client_id=f"{self.group_id}-out")
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            self.kafka.topics.compaction_requests,
            self.kafka.topics.control,
            bootstrap_servers=self.kafka.bootstrap_servers,
            group_id=self.group_id,
            client_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=30 * 60 * 1000,  # one user's run may take minutes of LLM calls
        )
        await self._consumer.start()
        log.info("compaction agent started: group %s, model %s", self.group_id, self.compactor.model)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        await self.compactor.aclose()

    async def run(self, stop: asyncio.Event | None = None, *, idle_exit_s: float | None = None) -> AgentStats:
        assert self._consumer is not None, "start() first"
        stop = stop or asyncio.Event()
        idle_since = time.monotonic()
        while not stop.is_set():
            batch = await self._consumer.getmany(timeout_ms=self.timeout_ms, max_records=self.max_records)
            if not batch:
                if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    break
                continue
            await self.process(batch)
            idle_since = time.monotonic()
        return self.stats

    async def _send(self, topic: str, pairs: Sequence[tuple[bytes | None, bytes]]) -> None:
        assert self._producer is not None
        futures = [await self._producer.send(topic, value=v, key=k) for k, v in pairs]
        if futures:
            await asyncio.gather(*futures)

    async def _produce_changes(self, changes: Sequence[MemoryChange]) -> None:
        from streams.kafka.topics import dumps, key_of

        await self._send(self.kafka.topics.memory_changes, [(key_of(c.user_id), dumps(c)) for c in changes])
        self.stats.changes += len(changes)

    async def _flush_dead(self) -> None:
        from streams.kafka.topics import dumps, key_of

        letters, self._dead.letters = self._dead.letters, []
        if letters:
            await self._send(self.kafka.topics.dead_letters, [(key_of(d.key), dumps(d)) for d in letters])
            self.stats.dead_letters += len(letters)

    async def _control(self, rec: ConsumerRecord) -> None:
        """``erase_user``: the user's memories written before the command, and their watermark, are removed.

        Only memories created at or before ``requested_at`` go, so a control topic replayed later (it is compacted:
        the last command per user stays) never erases what a returning user said afterwards.
        """
        from streams.kafka.topics import message_dead_letter, validation_kind, validation_reason

        if rec.value is None:
            return  # a tombstone: the command was cleared
        try:
            cmd = ControlRecord.model_validate_json(rec.value)
        except ValidationError as exc:
            self._dead.send(message_dead_letter(rec, "control", validation_reason(exc), validation_kind(exc)))
            return
        doomed = [r.memory_id for r in self.store.get_all(cmd.user_id) if r.created_at <= cmd.requested_at]
        if doomed:
            self.store.delete(cmd.user_id, doomed)
        self.compactor.watermarks.forget(cmd.user_id)
        self.stats.erased += 1
        log.info("erased user %s: %d memories (control record of %s)", cmd.user_id, len(doomed), cmd.requested_at)

    async def process(self, batch: Mapping[TopicPartition, Sequence[ConsumerRecord]]) -> None:
        """Handle a batch of requests (one user at a time, in order), then commit its offsets."""
        from streams.kafka.topics import message_dead_letter, validation_kind, validation_reason

        assert self._consumer is not None
        for records in batch.values():
            for rec in records:
                if rec.topic == self.kafka.topics.control:
                    await self._control(rec)
                    continue
                self.stats.requests += 1
                try:
                    req = CompactionRequest.model_validate_json(rec.value if rec.value is not None else b"")
                except ValidationError as exc:
                    self._dead.send(message_dead_letter(rec, "compact", validation_reason(exc), validation_kind(exc)))
                    continue
                if req.request_id in self._seen:
                    self.stats.duplicates += 1
                    continue
                run = await self.compactor.compact_user(req.user_id)
                self.ledger.record(run.cost)
                self.stats.users += 1
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
        await self._consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs})


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
) -> tuple[Any, AgentStats]:
    """The LTM sink (applying memory changes with ``change_hook``) and the compaction agent over ONE store.

    Both stop on ``stop``; when one of them ends (``idle_exit_s``, an error) the other is stopped too.
    ``owned``: (store, embed) already opened by this process (``lightmem serve --kafka``: its ``Memory``'s), used
    and left open; by default the encoder and the store are opened here and closed at the end.
    """
    from streams.encoder import load_encoder
    from streams.kafka.sink import LTMSink
    from streams.ltm import open_store
    from streams.memories import EmbeddingCache
    from streams.sleep.apply import change_hook

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
    stop = stop or asyncio.Event()
    try:
        await sink.start()
        await agent.start()
        tasks = [
            asyncio.create_task(sink.run(stop, idle_exit_s=idle_exit_s, heartbeat=heartbeat)),
            asyncio.create_task(agent.run(stop, idle_exit_s=idle_exit_s)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            await asyncio.wait(tasks)
        sink_stats, agent_stats = (t.result() for t in tasks)
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
) -> Any:
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
