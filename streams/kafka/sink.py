"""The LTM sink: STM summaries → memory records → embedded and upserted into the store.

One process owns the store (the embedded Qdrant folder, or a qdrant-client to a server when
``settings.store.url`` is set). It consumes the summaries and memory-changes topics with its own
consumer group (``<app_id>-ltm-sink``, auto-commit off) in batches of up to ``max_records`` records or
``timeout_ms`` milliseconds, and for each batch:

1. validates every record (a bad one → a dead letter with stage ``sink``, the reason, its topic,
   partition and offset, and the original bytes);
2. turns summaries into memories with ``summary_to_memories`` and writes them with ``write_memories``
   (in a worker thread: embedding is CPU work) — memory ids are deterministic, so a redelivered
   summary overwrites itself;
   An erasure barrier (``ControlRecord`` ``erase_user``, in order with the user's summaries) deletes the
   user's memories, drops their summaries before it in the batch, tombstones their memory changes and
   dead letters, and records the erasure time. Summaries and changes of a user computed before their latest
   erasure are dropped (the erasure epoch, ``streams.kafka.erasure.ErasureEpochs``: every erasure is read from
   the control topic at start-up and the new ones before each batch, so it survives a restart and holds for
   every sink instance);
3. hands valid memory changes to the ``apply_changes`` hook (the sleep-time engineer's; the default
   logs that they are not applied yet, and never drops them silently);
4. sends the dead letters and waits for their acknowledgement;
5. commits the batch's offsets — only now, after the write.

Backpressure (``streams.kafka.consumer.ConsumerService``): a write that fails for a transient reason (the
store does not answer) pauses the partitions, keeps polling (the sink stays in its group however long the
outage lasts) and retries the held batch with exponential backoff; nothing is committed meanwhile, and if
the process dies the uncommitted batch is redelivered to the next sink. A permanent error (``ValueError``,
``TypeError``, ``KeyError``) of one summary dead-letters that summary with the reason; the rest is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from schemas.records import ControlRecord, DeadLetter, MemoryChange, MemoryRecord, STMSummary
from streams import metrics
from streams.cost import CostLedger
from streams.dlq import dead_letter
from streams.ltm import MemoryStore
from streams.memories import summary_to_memories, write_memories
from streams.settings import Settings

from .codec import decode
from .consumer import PERMANENT, Batch, ConsumerService
from .erasure import ErasureEpochs, purge_user
from .topics import dumps, keyed_send, message_dead_letter, sink_group_id, spec_of

log = logging.getLogger(__name__)

ChangeHook = Callable[[Sequence[MemoryChange], MemoryStore], None]


def log_unapplied_changes(changes: Sequence[MemoryChange], store: MemoryStore) -> None:
    """Default hook until the sleep-time update lands: say loudly that changes were received, not applied."""
    for c in changes:
        log.warning(
            "memory change %s (%s of memory %s, user %s) received but not applied: no apply hook installed",
            c.change_id,
            c.action,
            c.memory_id,
            c.user_id,
        )


@dataclass
class SinkStats:
    batches: int = 0
    records: int = 0
    summaries: int = 0
    memories: int = 0
    changes: int = 0
    dead_letters: int = 0
    retries: int = 0
    erasures: int = 0
    last_record_at: float = 0.0


class LTMSink(ConsumerService):
    """Consumes summaries (and memory changes) and writes long-term memory; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: MemoryStore,
        embed: Callable[[Sequence[str]], np.ndarray],
        *,
        apply_changes: ChangeHook | None = None,
        max_records: int = 256,
        timeout_ms: int = 500,
        group_id: str | None = None,
        max_backoff_s: float = 30.0,
    ) -> None:
        kafka = settings.kafka
        super().__init__(
            kafka,
            [kafka.topics.summaries, kafka.topics.memory_changes],
            group_id or sink_group_id(kafka),
            max_records=max_records,
            timeout_ms=timeout_ms,
            max_backoff_s=max_backoff_s,
        )
        self.settings = settings
        self.store = store
        self.embed = embed
        self.apply_changes = apply_changes or log_unapplied_changes
        self.stats = SinkStats()
        self.ledger = CostLedger()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltm-sink")
        self.epochs = ErasureEpochs(kafka)  # user → time of their latest erasure (durable: the control topic)

    @property
    def erased(self) -> dict[str, datetime]:
        """User → time of their latest erasure (the erasure epoch); shared with a compaction agent."""
        return self.epochs.erased

    @property
    def topics(self) -> list[str]:
        return list(self.topic_names)

    async def _write_one_by_one(
        self, summaries: Sequence[STMSummary], now: datetime
    ) -> tuple[list[MemoryRecord], list[DeadLetter]]:
        """Write each summary alone; a summary whose write fails permanently becomes a dead letter."""
        loop = asyncio.get_running_loop()
        written: dict[str, MemoryRecord] = {}
        dead: list[DeadLetter] = []
        for s in summaries:
            recs = summary_to_memories(s, self.settings.pipeline_version, now)
            try:
                await loop.run_in_executor(self._pool, write_memories, recs, self.embed, self.store.upsert)
            except PERMANENT as exc:
                reason = f"writing the memories of summary {s.summary_id} failed: {exc}"
                dead.append(dead_letter("sink", reason, type(exc).__name__, s.model_dump_json(), s.user_id))
                continue
            written.update({m.memory_id: m for m in recs})
        return list(written.values()), dead

    async def _erase(self, cmd: ControlRecord) -> None:
        """The erasure barrier reached the sink: the user's memories, changes and dead letters go."""
        loop = asyncio.get_running_loop()
        points = await loop.run_in_executor(self._pool, self.store.delete_user, cmd.user_id)
        purged = await purge_user(self.kafka, cmd.user_id)
        self.epochs.note(cmd)
        self.stats.erasures += 1
        log.info("erased user %s: %d memories, %d change/dead-letter records tombstoned", cmd.user_id, points, purged)

    async def start(self) -> None:
        await super().start()
        n = await self.epochs.start()
        log.info("LTM sink: erasure epochs of %d user(s) read from %s", n, self.kafka.topics.control)

    async def stop(self) -> None:
        await super().stop()
        await self.epochs.stop()
        self._pool.shutdown(wait=True)

    async def run(  # type: ignore[override]
        self, stop: asyncio.Event | None = None, *, idle_exit_s: float | None = None, heartbeat: Path | None = None
    ) -> SinkStats:
        """Consume until ``stop`` is set (or, with ``idle_exit_s``, after that long without records).

        ``heartbeat``: a file touched on every poll, for liveness probes (a stuck sink stops touching it).
        """
        await super().run(stop, idle_exit_s=idle_exit_s, heartbeat=heartbeat)
        self.stats.retries = self.service_stats.retries
        return self.stats

    async def process(self, batch: Batch) -> None:
        """Validate, erase, write and dead-letter one batch (the base commits it afterwards)."""
        assert self._consumer is not None and self._producer is not None
        summaries: list[STMSummary] = []
        changes: list[MemoryChange] = []
        dead: list[DeadLetter] = []
        erasures: dict[str, ControlRecord] = {}
        t = self.kafka.topics
        specs = {t.summaries: spec_of(self.kafka, "summaries"), t.memory_changes: spec_of(self.kafka, "memory_changes")}
        for recs in batch.values():
            for rec in recs:  # in offset order per partition: a barrier splits a user's summaries
                self.stats.records += 1
                spec = specs.get(rec.topic)
                if spec is None:
                    dead.append(message_dead_letter(rec, "sink", f"unexpected topic {rec.topic}", "UnknownTopic"))
                    continue
                got = decode(spec, rec, "sink")
                if isinstance(got, DeadLetter):
                    dead.append(got)
                elif isinstance(got, ControlRecord):
                    # the summaries before the barrier derive from turns produced before the erasure: gone
                    summaries = [s for s in summaries if s.user_id != got.user_id]
                    erasures[got.user_id] = got
                elif isinstance(got, STMSummary):
                    summaries.append(got)
                elif isinstance(got, MemoryChange):
                    changes.append(got)
        loop = asyncio.get_running_loop()
        for cmd in erasures.values():
            await self._erase(cmd)
        # a summary or change computed before an erasure of its user (the erasure epoch, kept in the control
        # topic: a restarted or another sink instance knows it too) is dropped
        await self.epochs.refresh()
        late_summaries = [s for s in summaries if self.epochs.before_erasure(s.user_id, s.created_at)]
        late = [c for c in changes if self.epochs.before_erasure(c.user_id, c.at)]
        if late or late_summaries:
            log.warning(
                "LTM sink: %d summary(ies) and %d memory change(s) older than their user's erasure dropped",
                len(late_summaries),
                len(late),
            )
            summaries = [s for s in summaries if s not in late_summaries]
            changes = [c for c in changes if c not in late]

        now = datetime.now(UTC)
        by_id: dict[str, MemoryRecord] = {}
        for s in summaries:
            for m in summary_to_memories(s, self.settings.pipeline_version, now):
                by_id[m.memory_id] = m  # a redelivered summary: same deterministic ids, written once
        records = list(by_id.values())
        if records:
            try:
                emb, ups = await loop.run_in_executor(
                    self._pool, write_memories, records, self.embed, self.store.upsert
                )
                self.ledger.record(emb)
                self.ledger.record(ups)
            except PERMANENT:  # one bad summary must not hold the stream: write them one by one
                records, bad = await self._write_one_by_one(summaries, now)
                dead.extend(bad)
        if changes:
            await loop.run_in_executor(self._pool, self.apply_changes, changes, self.store)
        if dead:
            for d in dead:
                metrics.observe_dead_letter(d)
            n = self.kafka.partitions
            futures = [
                await self._producer.send(t.dead_letters, value=dumps(d), **keyed_send(d.key, d.dlq_id, n))
                for d in dead
            ]
            await asyncio.gather(*futures)
            for d in dead:
                log.error("dead letter (%s, %s): %s", d.stage, d.error_type, d.reason)
        offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items()}
        self.stats.batches += 1
        self.stats.summaries += len(summaries)
        self.stats.memories += len(records)
        self.stats.changes += len(changes)
        self.stats.dead_letters += len(dead)
        self.stats.last_record_at = time.time()
        log.info(
            "LTM sink: batch of %d records → %d summaries, %d memories, %d changes, %d dead letters; committing %s",
            sum(len(r) for r in batch.values()),
            len(summaries),
            len(records),
            len(changes),
            len(dead),
            ", ".join(f"{tp.topic}[{tp.partition}]={o}" for tp, o in sorted(offsets.items())),
        )


async def run_sink(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    idle_exit_s: float | None = None,
    max_records: int = 256,
    timeout_ms: int = 500,
    apply_changes: ChangeHook | None = None,
    heartbeat: Path | None = None,
) -> SinkStats:
    """Open the encoder and the store (this process owns it), run the sink, close everything."""
    from streams.encoder import load_encoder
    from streams.ltm import open_store
    from streams.memories import EmbeddingCache

    encoder = load_encoder(settings.embedding)
    store = open_store(settings.store, encoder.dim)
    sink = LTMSink(
        settings,
        store,
        EmbeddingCache(encoder.embed, encoder.dim),
        apply_changes=apply_changes,
        max_records=max_records,
        timeout_ms=timeout_ms,
    )
    try:
        await sink.start()
        return await sink.run(stop, idle_exit_s=idle_exit_s, heartbeat=heartbeat)
    finally:
        await sink.stop()
        store.close()
