"""The Faust worker app: the sensory processor and the STM aggregator over Kafka.

Agents (the shell only; every decision is a stage function of ``streams``):

- **sensory** over the raw-turn topic, one record at a time: validate ``RawTurn`` (a bad record → a dead
  letter with stage ``ingest``, the reason and the original bytes; the stream goes on), then
  ``compress_turns`` and ``segment.segment`` against the user's
  ``SensoryBufferState`` (Faust table ``sensory``), closed ``TopicSegment``\\ s → the segments topic.
- **stm** over the segments topic: ``stm.add`` against the user's ``STMBufferState`` (table ``stm``); a
  full batch → ``Extractor.extract`` (async HTTP) → the ``STMSummary`` to the summaries topic, or its
  dead letter to the dead-letter topic.
- **idle timer** (every ``tick_s``): for users of this worker's partitions idle past
  ``settings.stm.idle_timeout_s``, ``segment.flush`` their sensory buffer (→ segments topic), then
  ``stm.due``/``stm.flush`` → extract → summaries once the flushed segments have reached STM.

Model work (compression, segmentation) runs in a one-thread executor so the event loop keeps serving
other partitions, heartbeats and commits; the LLM call is awaited on the loop.

State: both tables live in memory (``store="memory://"``) and are backed by compacted changelog topics,
so a restarted or added worker recovers them. A table row is JSON::

    sensory[user] = {"state": SensoryBufferState, "offset": last raw-turn offset applied,
                     "seen_at": epoch s of the user's last turn, "pending": [segment ids flushed by the timer]}
    stm[user]     = {"state": STMBufferState, "offset": last segment offset applied,
                     "recent": [ids of the last segments handed to extraction]}

Delivery is at-least-once. Each record's outputs are acknowledged by Kafka *before* the row that
records it is written, and the row carries the offset it applied, so after a crash: a redelivered
record at or below that offset is skipped; a record whose outputs went out but whose row did not is
recomputed (same deterministic ids); a re-emitted segment already batched is skipped via ``recent``;
a re-emitted summary overwrites itself in the store. Workers never open Qdrant.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from pydantic import ValidationError

from schemas.records import (
    DeadLetter,
    RawTurn,
    SensoryBufferState,
    StageCost,
    STMBufferState,
    TopicSegment,
)
from streams import segment as sensory
from streams import stm
from streams.cost import CostLedger
from streams.settings import Settings
from streams.stages import Stages

from .topics import (
    dumps,
    error_dead_letter,
    key_of,
    message_dead_letter,
    partition_for,
    validation_kind,
    validation_reason,
)

log = logging.getLogger("streams.kafka.app")

RECENT_SEGMENTS = 1024  # ids of batched segments remembered per user (re-emission guard)
STATS_EVERY_S = 5.0
GAP_ACCEPT_S = 10.0  # a gap still there this long after seeking back is accepted (log start moved)
STALL_S = 3.0  # an agent idle this long while a partition of it is behind its end re-fetches that partition
PROGRESS = b"\x00progress:"  # table keys of per-partition progress rows (user ids never start with NUL)


@dataclass
class SensoryRow:
    state: SensoryBufferState
    offset: int = -1
    seen_at: float = 0.0
    pending: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, raw: bytes | None, user_id: str) -> SensoryRow:
        if raw is None:
            return cls(SensoryBufferState(user_id=user_id))
        d = json.loads(raw)
        return cls(SensoryBufferState.model_validate(d["state"]), d["offset"], d["seen_at"], d.get("pending", []))

    def dump(self) -> bytes:
        d = {"state": self.state.model_dump(mode="json"), "offset": self.offset, "seen_at": self.seen_at}
        d["pending"] = self.pending
        return json.dumps(d, separators=(",", ":")).encode()


@dataclass
class STMRow:
    state: STMBufferState
    offset: int = -1
    recent: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, raw: bytes | None, user_id: str) -> STMRow:
        if raw is None:
            return cls(stm.empty(user_id))
        d = json.loads(raw)
        return cls(STMBufferState.model_validate(d["state"]), d["offset"], d.get("recent", []))

    def dump(self) -> bytes:
        d = {"state": self.state.model_dump(mode="json"), "offset": self.offset, "recent": self.recent}
        return json.dumps(d, separators=(",", ":")).encode()

    def knows(self, segment_id: str) -> bool:
        return segment_id in self.recent or any(s.segment_id == segment_id for s in self.state.segments)


class UserTable(faust.Table):
    """A table keyed by user id whose changelog partition is the key's partition (murmur2, as producers).

    That is the user's raw-turn (and segment) partition, known without a current stream event, so the
    idle timer can write rows too. (Faust's own ``use_partitioner=True`` needs the changelog topic in
    the producer's metadata before its first send and crashes otherwise.)
    """

    def partition_for_key(self, key: Any) -> int | None:
        assert self.partitions is not None, "UserTable needs its partition count"
        if key.startswith(PROGRESS):
            return int(key[len(PROGRESS) :])
        return partition_for(key, self.partitions)


def progress_key(partition: int) -> bytes:
    """Row of a partition's progress (highest source offset handled): stored in that changelog partition."""
    return PROGRESS + str(partition).encode()


@dataclass
class WorkerStats:
    turns: int = 0
    skipped_turns: int = 0
    segments_out: int = 0
    segments_in: int = 0
    summaries: int = 0
    dead_letters: int = 0
    idle_flushes: int = 0
    reseeks: int = 0


class Shell:
    """The worker's wiring: topics, tables, agents and the timer around the loaded ``Stages``."""

    def __init__(
        self,
        settings: Settings,
        stages: Stages,
        *,
        web_port: int | None = None,
        datadir: Path | None = None,
        tick_s: float | None = None,
        standby_replicas: int = 0,
        session_timeout_s: float = 10.0,
        commit_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.stages = stages
        self.kafka = settings.kafka
        self.partitions = settings.kafka.partitions
        self.idle_s = settings.stm.idle_timeout_s
        self.tick_s = tick_s or max(0.2, min(1.0, self.idle_s / 4))
        self.stats = WorkerStats()
        self._last_stats, self._last_stats_at = "", 0.0
        self._expected: dict[TP, int] = {}  # next offset per source partition (delivery order check)
        self._sought: dict[TP, tuple[int, float]] = {}  # partitions sought back: (offset, when)
        self._busy: dict[str, int] = defaultdict(int)  # events in progress per source topic
        self._activity: dict[str, float] = defaultdict(time.monotonic)  # last start/end of an event
        self.ledger = CostLedger()
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightmem-cpu")
        self._locks: dict[bytes, asyncio.Lock] = defaultdict(asyncio.Lock)
        t = settings.kafka.topics
        datadir = datadir or settings.data_dir / "faust"
        datadir.mkdir(parents=True, exist_ok=True)
        app = faust.App(
            settings.kafka.app_id,
            broker=[f"kafka://{h.strip()}" for h in settings.kafka.bootstrap_servers.split(",") if h.strip()],
            store="memory://",
            topic_partitions=settings.kafka.partitions,
            topic_replication_factor=settings.kafka.replication_factor,
            table_standby_replicas=standby_replicas,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=commit_interval_s,
            broker_session_timeout=session_timeout_s,
            broker_heartbeat_interval=min(3.0, session_timeout_s / 4),
            web_enabled=web_port is not None,
            web_port=web_port or 6066,
            web_bind="127.0.0.1",
            datadir=str(datadir),
            timezone=UTC,
            key_serializer="raw",
            value_serializer="raw",
        )
        self.app = app
        raw_kw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.raw_topic = app.topic(t.raw_turns, partitions=self.partitions, **raw_kw)
        self.segments_topic = app.topic(t.segments, partitions=self.partitions, **raw_kw)
        self.summaries_topic = app.topic(t.summaries, partitions=self.partitions, **raw_kw)
        self.dlq_topic = app.topic(t.dead_letters, partitions=self.partitions, **raw_kw)
        self.sensory_table = self._table("sensory", "per-user sensory buffer (JSON)")
        self.stm_table = self._table("stm", "per-user STM buffer (JSON)")

        app.agent(self.raw_topic, name="sensory")(self._sensory_agent)
        app.agent(self.segments_topic, name="stm")(self._stm_agent)
        app.timer(self.tick_s, name="idle-flush")(self._idle_timer)
        app.on_partitions_assigned.connect(self._on_assigned)

    def _table(self, name: str, help: str) -> UserTable:
        table = UserTable(
            self.app,
            name=name,
            default=None,
            beacon=self.app.tables.beacon,
            partitions=self.partitions,
            key_type=bytes,  # → the "raw" codec: keys are user-id bytes, values JSON bytes
            value_type=bytes,
            help=help,
        )
        return self.app.tables.add(table)  # type: ignore[return-value]

    # -- helpers ------------------------------------------------------------------------------------
    async def _cpu_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    async def _send(self, topic: faust.types.TopicT, key: bytes | None, value: bytes) -> Any:
        return await topic.send(key=key, value=value)

    async def _send_all(self, sends: Sequence[tuple[faust.types.TopicT, bytes | None, bytes]]) -> None:
        """Send and wait until Kafka acknowledged every record."""
        futures = [await self._send(topic, key, value) for topic, key, value in sends]
        if futures:
            await asyncio.gather(*futures)

    async def _dead(self, letters: Sequence[DeadLetter]) -> None:
        for d in letters:
            log.error("dead letter (%s, %s): %s", d.stage, d.error_type, d.reason)
        self.stats.dead_letters += len(letters)
        await self._send_all([(self.dlq_topic, key_of(d.key), dumps(d)) for d in letters])

    def _local(self, key: bytes) -> bool:
        p = partition_for(key, self.partitions)
        return TP(self.kafka.topics.raw_turns, p) in self.app.assignor.assigned_actives()

    async def _in_order(self, msg: Any, table: UserTable) -> bool:
        """Accept a delivery unless records before it in its partition never arrived.

        Offsets of our topics are contiguous (no compaction, no transactional markers), so a delivery past
        the next expected offset means the consumer dropped records: Faust discards a fetch that completes
        during a rebalance and moves on. Then the partition is sought back to the expected offset and
        deliveries past it are dropped until the re-fetch arrives (a redelivery at or below what a user's
        row applied is skipped downstream). A gap still there ``GAP_ACCEPT_S`` after the seek is accepted:
        the log start moved past it (retention).
        """
        tp = TP(msg.topic, msg.partition)
        expected = self._expected.get(tp)
        if expected is None:
            expected = self._progress(table, msg.partition) + 1
        if msg.offset <= expected:
            if msg.offset == expected:
                self._sought.pop(tp, None)
            self._expected[tp] = max(expected, msg.offset + 1)
            return True
        now = time.monotonic()
        sought = self._sought.get(tp)
        if sought is not None and sought[0] == expected and now - sought[1] >= GAP_ACCEPT_S:
            log.warning(
                "partition %s[%d]: offsets %d..%d are gone; going on", tp.topic, tp.partition, expected, msg.offset - 1
            )
            self._sought.pop(tp, None)
            self._expected[tp] = msg.offset + 1
            return True
        if sought is None or sought[0] != expected:
            log.warning(
                "partition %s[%d]: offset %d delivered while %d was expected (the consumer dropped records); "
                "seeking back",
                tp.topic,
                tp.partition,
                msg.offset,
                expected,
            )
            self.stats.reseeks += 1
            self._sought[tp] = (expected, now)
            await self.app.consumer.seek(tp, expected)
        return False

    async def _on_assigned(self, *args: Any, **kwargs: Any) -> None:
        self._expected.clear()
        self._sought.clear()

    def _advance(self, table: UserTable, messages: Sequence[Any]) -> None:
        """Record the highest offset handled per partition (valid, skipped or dead-lettered alike)."""
        top: dict[int, int] = {}
        for m in messages:
            top[m.partition] = max(top.get(m.partition, -1), m.offset)
        for part, offset in top.items():
            if offset > self._progress(table, part):
                table[progress_key(part)] = str(offset).encode()

    @staticmethod
    def _progress(table: UserTable, partition: int) -> int:
        raw = table.get(progress_key(partition))
        return -1 if raw is None else int(raw)

    def _caught_up(self, table: UserTable, topic: str, partition: int) -> bool:
        """True when this worker has handled every record of the partition it has fetched the end of.

        An idle timeout only means "the user is idle" when their partition has no backlog: after a restart
        or a rebalance, a user's last turn may be old while their next turns still wait in the topic.
        """
        hw = self._hw(topic, partition)
        if hw is None:
            return False  # nothing fetched yet
        return self._progress(table, partition) >= hw - 1

    def _user_keys(self, table: UserTable) -> list[bytes]:
        return [k for k in list(table.keys()) if not k.startswith(PROGRESS) and self._local(k)]

    def _sensory_row(self, key: bytes, user_id: str) -> SensoryRow:
        return SensoryRow.load(self.sensory_table.get(key), user_id)

    # -- sensory ------------------------------------------------------------------------------------
    async def _sensory_agent(self, stream: faust.StreamT) -> None:
        # One event at a time: Faust's take()/take_events() buffering was seen to leave a partition
        # undelivered after a rebalance (records fetched, never handed to the agent).
        async for event in stream.events():
            if await self._in_order(event.message, self.sensory_table):
                await self.handle_turns([event.message])

    async def handle_turns(self, messages: Sequence[Any]) -> None:
        topic = self.kafka.topics.raw_turns
        self._busy[topic] += 1
        try:
            await self._handle_turns(messages)
        finally:
            self._advance(self.sensory_table, messages)
            self._busy[topic] -= 1
            self._activity[topic] = time.monotonic()

    async def _handle_turns(self, messages: Sequence[Any]) -> None:
        parsed: list[tuple[RawTurn, Any]] = []
        dead: list[DeadLetter] = []
        for msg in messages:
            try:
                turn = RawTurn.model_validate_json(msg.value if msg.value is not None else b"")
            except ValidationError as exc:
                dead.append(message_dead_letter(msg, "ingest", validation_reason(exc), validation_kind(exc)))
                continue
            if msg.key != key_of(turn.user_id):
                reason = f"record key {msg.key!r} is not the turn's user id {turn.user_id!r}"
                dead.append(message_dead_letter(msg, "ingest", reason, "KeyMismatch"))
                continue
            if turn.user_id.startswith("\x00"):
                dead.append(message_dead_letter(msg, "ingest", "user ids must not start with NUL", "ReservedUserId"))
                continue
            parsed.append((turn, msg))
        if dead:
            await self._dead(dead)
        if not parsed:
            return
        # redeliveries below a user's applied offset are skipped before any model work
        fresh = [(t, m) for t, m in parsed if m.offset > self._sensory_row(m.key, t.user_id).offset]
        self.stats.skipped_turns += len(parsed) - len(fresh)
        if not fresh:
            return
        t0 = time.perf_counter()
        try:
            compressed = await self._cpu_call(self.stages.compress, [t for t, _ in fresh])
        except Exception:  # a model failure on the batch: isolate the bad turn(s) one by one
            log.exception("compression of a batch of %d turns failed; retrying one by one", len(fresh))
            compressed = []
            kept = []
            for turn, msg in fresh:
                try:
                    compressed.extend(await self._cpu_call(self.stages.compress, [turn]))
                    kept.append((turn, msg))
                except Exception as exc:  # noqa: BLE001 - becomes a dead letter
                    await self._dead([error_dead_letter(msg, "compress", exc)])
            fresh = kept
        self.ledger.record(StageCost(stage="compression", seconds=time.perf_counter() - t0, items=len(fresh)))
        for (turn, msg), ct in zip(fresh, compressed, strict=True):
            async with self._locks[msg.key]:
                row = SensoryRow.load(self.sensory_table.get(msg.key), turn.user_id)
                if msg.offset <= row.offset:
                    self.stats.skipped_turns += 1
                    continue
                t1 = time.perf_counter()
                try:
                    segments, state = await self._cpu_call(sensory.segment, row.state, ct, self.stages.segmenter)
                except Exception as exc:  # noqa: BLE001 - the turn becomes a dead letter, the stream goes on
                    await self._dead([error_dead_letter(msg, "segment", exc)])
                    row.offset = msg.offset
                    self.sensory_table[msg.key] = row.dump()
                    continue
                self.ledger.record(StageCost(stage="segmentation", seconds=time.perf_counter() - t1, items=1))
                await self._send_all([(self.segments_topic, msg.key, dumps(s)) for s in segments])
                self.stats.turns += 1
                self.stats.segments_out += len(segments)
                row.state, row.offset, row.seen_at = state, msg.offset, time.time()
                self.sensory_table[msg.key] = row.dump()

    # -- STM ----------------------------------------------------------------------------------------
    async def _stm_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            if await self._in_order(event.message, self.stm_table):
                await self.handle_segment(event.message)

    async def handle_segment(self, msg: Any) -> None:
        topic = self.kafka.topics.segments
        self._busy[topic] += 1
        try:
            await self._handle_segment(msg)
        finally:
            self._advance(self.stm_table, [msg])
            self._busy[topic] -= 1
            self._activity[topic] = time.monotonic()

    async def _handle_segment(self, msg: Any) -> None:
        try:
            seg = TopicSegment.model_validate_json(msg.value if msg.value is not None else b"")
        except ValidationError as exc:
            await self._dead([message_dead_letter(msg, "stm", validation_reason(exc), validation_kind(exc))])
            return
        if msg.key != key_of(seg.user_id):
            reason = f"record key {msg.key!r} is not the segment's user id {seg.user_id!r}"
            await self._dead([message_dead_letter(msg, "stm", reason, "KeyMismatch")])
            return
        async with self._locks[msg.key]:
            row = STMRow.load(self.stm_table.get(msg.key), seg.user_id)
            if msg.offset <= row.offset or row.knows(seg.segment_id):
                if msg.offset > row.offset:
                    row.offset = msg.offset
                    self.stm_table[msg.key] = row.dump()
                return
            self.stats.segments_in += 1
            batch, row.state = stm.add(row.state, seg, datetime.now(UTC), self.settings.stm)
            if batch:
                await self._extract_and_emit(seg.user_id, batch)
                row.recent = (row.recent + [s.segment_id for s in batch])[-RECENT_SEGMENTS:]
            row.offset = msg.offset
            self.stm_table[msg.key] = row.dump()

    async def _extract_and_emit(self, user_id: str, batch: Sequence[TopicSegment]) -> None:
        res = await self.stages.extractor.extract(user_id, batch, datetime.now(UTC))
        self.ledger.record(res.cost)
        if res.summary is not None:
            await self._send_all([(self.summaries_topic, key_of(user_id), dumps(res.summary))])
            self.stats.summaries += 1
        if res.dead_letter is not None:
            await self._dead([res.dead_letter])

    # -- idle flush ---------------------------------------------------------------------------------
    async def _idle_timer(self) -> None:
        app = self.app
        self._log_stats()
        if app.rebalancing or getattr(app, "in_recovery", False):
            return
        try:
            await self.unstick_partitions(time.monotonic())
            await self.flush_idle(time.time())
        except Exception:
            log.exception("idle flush failed; retrying on the next tick")

    async def unstick_partitions(self, now: float) -> None:
        """Re-fetch a partition whose fetched records never reached the agent.

        Faust drops the records of a fetch that completes while the consumer generation changes (a
        rebalance) without seeking back, and still advances its read offset, so the partition sits
        behind its end until the next rebalance. When an agent has been idle for ``STALL_S`` while one of
        its partitions is behind its end offset, that partition is sought back to the first offset the
        agent has not handled; the offset watermarks of the tables make a re-delivery harmless.
        """
        t = self.kafka.topics
        tables = {t.raw_turns: self.sensory_table, t.segments: self.stm_table}
        stalled = []
        for tp in self.app.assignor.assigned_actives():
            if tp.topic not in tables or self._busy[tp.topic] or now - self._activity[tp.topic] < STALL_S:
                continue
            hw = self._hw(tp.topic, tp.partition)
            done = self._progress(tables[tp.topic], tp.partition)
            if hw is not None and done < hw - 1:
                stalled.append((tp, done, hw))
        for tp, done, hw in stalled:
            log.warning(
                "partition %s[%d] stalled: handled up to offset %d of %d, agent idle for %.0f s; seeking back",
                tp.topic,
                tp.partition,
                done,
                hw - 1,
                now - self._activity[tp.topic],
            )
            self.stats.reseeks += 1
            self._expected.pop(tp, None)
            await self.app.consumer.seek(tp, done + 1)
        for tp, _, _ in stalled:
            self._activity[tp.topic] = now

    def _log_stats(self) -> None:
        """An info line when the counters changed (at most every ``STATS_EVERY_S``): progress per partition."""
        now = time.monotonic()
        snapshot = repr(self.stats)
        if now - self._last_stats_at < STATS_EVERY_S or (
            snapshot == self._last_stats and now - self._last_stats_at < 30
        ):
            return
        self._last_stats, self._last_stats_at = snapshot, now
        t = self.kafka.topics
        parts = sorted(tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == t.raw_turns)
        progress = {
            p: (self._progress(self.sensory_table, p), self._hw(t.raw_turns, p), self._progress(self.stm_table, p))
            for p in parts
        }
        consumer = self.app.consumer
        active = sorted(str(tp.partition) + tp.topic[-3:] for tp in getattr(consumer, "_active_partitions", None) or ())
        paused = sorted(str(tp.partition) + tp.topic[-3:] for tp in getattr(consumer, "_paused_partitions", None) or ())
        log.info(
            "worker stats: %s; partition: (turn progress, turn end, segment progress) %s; active %s paused %s"
            " flow_active=%s flow_control=%s",
            snapshot,
            progress,
            active,
            paused,
            getattr(consumer, "flow_active", None),
            getattr(self.app.flow_control, "is_active", lambda: None)(),
        )

    def _hw(self, topic: str, partition: int) -> int | None:
        try:
            return self.app.consumer.highwater(TP(topic, partition))
        except (AssertionError, KeyError):
            return None

    async def flush_idle(self, now_s: float) -> None:
        """Flush the sensory, then the STM buffers of this worker's users idle past the timeout."""
        t = self.kafka.topics
        caught_up = {
            p: self._caught_up(self.sensory_table, t.raw_turns, p) and self._caught_up(self.stm_table, t.segments, p)
            for p in range(self.partitions)
        }
        for key in self._user_keys(self.sensory_table):
            if caught_up[partition_for(key, self.partitions)]:
                await self._flush_sensory(key, now_s)
        now = datetime.now(UTC)
        for key in self._user_keys(self.stm_table):
            if caught_up[partition_for(key, self.partitions)]:
                await self._flush_stm(key, now_s, now)

    def _sensory_idle(self, row: SensoryRow, now_s: float) -> bool:
        return now_s - row.seen_at >= self.idle_s

    async def _flush_sensory(self, key: bytes, now_s: float) -> None:
        user = key.decode()
        row = self._sensory_row(key, user)
        if not row.state.turns or not self._sensory_idle(row, now_s):
            return
        async with self._locks[key]:
            row = self._sensory_row(key, user)  # re-read under the lock
            if not row.state.turns or not self._sensory_idle(row, now_s):
                return
            segments, state = await self._cpu_call(sensory.flush, row.state, self.stages.segmenter)
            await self._send_all([(self.segments_topic, key, dumps(s)) for s in segments])
            self.stats.segments_out += len(segments)
            self.stats.idle_flushes += 1
            row.state = state
            row.pending = [s.segment_id for s in segments]
            self.sensory_table[key] = row.dump()
            log.info("idle flush of %s: %d segment(s) from the sensory buffer", user, len(segments))

    async def _flush_stm(self, key: bytes, now_s: float, now: datetime) -> None:
        user = key.decode()
        row = STMRow.load(self.stm_table.get(key), user)
        if not stm.due(row.state, now, self.settings.stm):
            return
        async with self._locks[key]:
            srow = self._sensory_row(key, user)
            if srow.state.turns or not self._sensory_idle(srow, now_s):
                return  # the user is still active upstream: more segments will come
            row = STMRow.load(self.stm_table.get(key), user)
            if srow.pending:
                if not all(row.knows(s) for s in srow.pending):
                    return  # segments flushed by the timer have not reached STM yet
                srow.pending = []
                self.sensory_table[key] = srow.dump()
            if not stm.due(row.state, now, self.settings.stm):
                return
            batch, row.state = stm.flush(row.state)
            if batch:
                await self._extract_and_emit(user, batch)
                row.recent = (row.recent + [s.segment_id for s in batch])[-RECENT_SEGMENTS:]
                self.stats.idle_flushes += 1
                log.info("idle flush of %s: STM batch of %d segment(s) extracted", user, len(batch))
            self.stm_table[key] = row.dump()


def create_shell(settings: Settings, stages: Stages | None = None, **kwargs: Any) -> Shell:
    """Build the worker app around loaded stages (loading them from settings when not given)."""
    from streams.sleep.kafka_agent import install_crontab  # the nightly sleep-time requests

    shell = Shell(settings, stages or Stages(settings), **kwargs)
    install_crontab(shell)
    return shell
