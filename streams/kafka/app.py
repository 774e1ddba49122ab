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
  ``streams.idle.decide`` → ``stm.flush`` → extract → summaries once the flushed segments have reached STM.

Model work (compression, segmentation) runs in a one-thread executor so the event loop keeps serving
other partitions, heartbeats and commits; the LLM call is awaited on the loop.

State: both tables live in memory (``store="memory://"``) and are backed by compacted changelog topics,
so a restarted or added worker recovers them. A table row is JSON::

    sensory[user] = SensoryTableRow {state: SensoryBufferState, offset: last raw-turn offset applied,
                     seen_at: epoch s of the user's last turn, pending: marks of turns flushed by the timer}
    stm[user]     = STMTableRow {state: STMBufferState, offset: last segment offset applied,
                     recent: ids of the last segments handed to extraction}

(versioned models in ``schemas.records``, with JSON Schema files like every topic record).

Delivery is at-least-once. Each record's outputs are acknowledged by Kafka *before* the row that
records it is written, and the row carries the offset it applied, so after a crash: a redelivered
record at or below that offset is skipped; a record whose outputs went out but whose row did not is
recomputed (same deterministic ids); a re-emitted segment already batched is skipped via ``recent``;
a re-emitted summary overwrites itself in the store. A turn re-produced at a new offset (same user, session
and seq) is dropped by the per-session seq marks of the user's buffers (``streams.seqmarks``), and STM drops
turns it already took from any segment, so no turn reaches two extraction batches. Workers never open Qdrant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from pydantic import ValidationError

from schemas.records import (
    ControlRecord,
    DeadLetter,
    RawTurn,
    StageCost,
    TopicSegment,
)
from streams import idle, metrics, seqmarks, stm
from streams import segment as sensory
from streams.cost import CostLedger
from streams.settings import Settings
from streams.stages import Stages

from .codec import decode
from .compaction import install_crontab
from .delivery import Delivery
from .keys import KeyRing, KeyShredded, unseal
from .tables import PROGRESS, SensoryRow, STMRow, UserTable
from .topics import (
    dumps,
    error_dead_letter,
    key_of,
    keyed_send,
    partition_for,
    spec_of,
)

log = logging.getLogger("streams.kafka.app")

RECENT_SEGMENTS = 1024  # ids of batched segments remembered per user (re-emission guard)
STATS_EVERY_S = 5.0


@dataclass
class WorkerStats:
    turns: int = 0
    skipped_turns: int = 0
    duplicate_turns: int = 0
    segments_out: int = 0
    segments_in: int = 0
    summaries: int = 0
    dead_letters: int = 0
    idle_flushes: int = 0
    reseeks: int = 0
    erasures: int = 0
    redeliveries: int = 0
    shredded_turns: int = 0


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
        self.delivery = Delivery(app, self.stats)
        raw_kw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.raw_topic = app.topic(t.raw_turns, partitions=self.partitions, **raw_kw)
        self.segments_topic = app.topic(t.segments, partitions=self.partitions, **raw_kw)
        self.summaries_topic = app.topic(t.summaries, partitions=self.partitions, **raw_kw)
        self.dlq_topic = app.topic(t.dead_letters, partitions=self.partitions, **raw_kw)
        self.keys = KeyRing(settings.kafka)  # the users' content keys (sealed turns)
        self._raw_spec = spec_of(settings.kafka, "raw_turns")
        self._segments_spec = spec_of(settings.kafka, "segments")
        self.sensory_table = self._table("sensory", "per-user sensory buffer (JSON)")
        self.stm_table = self._table("stm", "per-user STM buffer (JSON)")

        app.agent(self.raw_topic, name="sensory")(self._sensory_agent)
        app.agent(self.segments_topic, name="stm")(self._stm_agent)
        app.timer(self.tick_s, name="idle-flush")(self._idle_timer)
        app.on_partitions_assigned.connect(self.delivery.on_assigned)

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

    async def _send(
        self, topic: faust.types.TopicT, key: bytes | None, value: bytes, partition: int | None = None
    ) -> Any:
        return await topic.send(key=key, value=value, partition=partition)

    async def _send_all(self, sends: Sequence[tuple[faust.types.TopicT, bytes | None, bytes]]) -> None:
        """Send and wait until Kafka acknowledged every record."""
        futures = [await self._send(topic, key, value) for topic, key, value in sends]
        if futures:
            await asyncio.gather(*futures)

    async def _dead(self, letters: Sequence[DeadLetter]) -> None:
        for d in letters:
            log.error("dead letter (%s, %s): %s", d.stage, d.error_type, d.reason)
        self.stats.dead_letters += len(letters)
        for d in letters:
            metrics.observe_dead_letter(d)
        futures = []
        for d in letters:
            kw = keyed_send(d.key, d.dlq_id, self.partitions)
            futures.append(await self._send(self.dlq_topic, kw["key"], dumps(d), kw["partition"]))
        if futures:
            await asyncio.gather(*futures)

    def _local(self, key: bytes) -> bool:
        p = partition_for(key, self.partitions)
        return TP(self.kafka.topics.raw_turns, p) in self.app.assignor.assigned_actives()

    def _user_keys(self, table: UserTable) -> list[bytes]:
        return [k for k in list(table.keys()) if not k.startswith(PROGRESS) and self._local(k)]

    def last_seen(self) -> dict[str, float]:
        """Users of this worker's partitions → epoch seconds of their last turn (the nightly crontab's input)."""
        out = {}
        for key in self._user_keys(self.sensory_table):
            user = key.decode()
            out[user] = self._sensory_row(key, user).seen_at
        return out

    def _sensory_row(self, key: bytes, user_id: str) -> SensoryRow:
        return SensoryRow.load(self.sensory_table.get(key), user_id)

    # -- sensory ------------------------------------------------------------------------------------
    async def _sensory_agent(self, stream: faust.StreamT) -> None:
        # One event at a time: Faust's take()/take_events() buffering was seen to leave a partition
        # undelivered after a rebalance (records fetched, never handed to the agent).
        async for event in stream.events():
            if await self.delivery.in_order(event.message, self.sensory_table):
                await self.handle_turns([event.message])

    async def handle_turns(self, messages: Sequence[Any]) -> None:
        with self.delivery.handling(self.kafka.topics.raw_turns, self.sensory_table, messages):
            await self._handle_turns(messages)

    async def _handle_turns(self, messages: Sequence[Any]) -> None:
        run: list[Any] = []
        for msg in messages:  # in offset order; an erasure barrier splits the run
            rec = decode(self._raw_spec, msg, "ingest")
            if isinstance(rec, ControlRecord):
                await self._turn_run(run)
                run = []
                await self._erase_sensory(msg, rec)
            else:
                run.append((msg, rec))
        await self._turn_run(run)

    async def _erase_sensory(self, msg: Any, cmd: ControlRecord) -> None:
        """The erasure barrier in the user's raw turns: drop their sensory row, pass the barrier on to STM."""
        self.keys.forget(cmd.user_id)
        async with self._locks[msg.key]:
            self.sensory_table.pop(msg.key, None)  # a tombstone in the changelog
            await self._send_all([(self.segments_topic, msg.key, dumps(cmd))])
            self.stats.erasures += 1
        log.info("erasure of %s: sensory buffer dropped (raw offset %d)", cmd.user_id, msg.offset)

    async def _turn_run(self, run: Sequence[tuple[Any, Any]]) -> None:
        parsed: list[tuple[RawTurn, Any]] = []
        dead: list[DeadLetter] = []
        for msg, rec in run:
            if isinstance(rec, DeadLetter):
                dead.append(rec)
            elif isinstance(rec, RawTurn):
                try:
                    parsed.append((await unseal(rec, self.keys), msg))
                except KeyShredded:  # the user was erased: their turn can no longer be read, by design
                    self.stats.shredded_turns += 1
                except (ValueError, ValidationError) as exc:
                    dead.append(error_dead_letter(msg, "ingest", exc))
        if dead:
            await self._dead(dead)
        if not parsed:
            return
        # redeliveries below a user's applied offset, and turns of a session at or below the seq the user's
        # buffer already took (a re-produced turn: same user, session and seq at a new offset), are skipped
        # before any model work; segment() applies the same seq rule, so the embedded runner drops them too
        fresh = []
        for t, m in parsed:
            row = self._sensory_row(m.key, t.user_id)
            if m.offset <= row.offset:
                self.stats.skipped_turns += 1
            elif t.seq <= row.state.last_seq.get(t.session_id, -1):
                self.stats.duplicate_turns += 1
                log.debug("duplicate turn %s (%s #%d) at offset %d dropped", t.turn_id, t.session_id, t.seq, m.offset)
            else:
                fresh.append((t, m))
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
            if await self.delivery.in_order(event.message, self.stm_table):
                await self.handle_segment(event.message)

    async def handle_segment(self, msg: Any) -> None:
        with self.delivery.handling(self.kafka.topics.segments, self.stm_table, [msg]):
            await self._handle_segment(msg)

    async def _handle_segment(self, msg: Any) -> None:
        rec = decode(self._segments_spec, msg, "stm")
        if isinstance(rec, DeadLetter):
            await self._dead([rec])
            return
        if isinstance(rec, ControlRecord):
            async with self._locks[msg.key]:
                self.stm_table.pop(msg.key, None)
                await self._send_all([(self.summaries_topic, msg.key, dumps(rec))])
            log.info("erasure of %s: STM buffer dropped, barrier passed to the sink", rec.user_id)
            return
        assert isinstance(rec, TopicSegment)
        seg = rec
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
            t = self.kafka.topics
            await self.delivery.unstick({t.raw_turns: self.sensory_table, t.segments: self.stm_table}, time.monotonic())
            await self.flush_idle(time.time())
        except Exception:
            log.exception("idle flush failed; retrying on the next tick")

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
            p: (
                self.delivery.progress(self.sensory_table, p),
                self.delivery.hw(t.raw_turns, p),
                self.delivery.progress(self.stm_table, p),
            )
            for p in parts
        }
        for p, (done, end, _) in progress.items():
            if done is not None and end is not None:
                metrics.set_consumer_lag(self.app.conf.id, t.raw_turns, p, max(0, end - done - 1))
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

    async def flush_idle(self, now_s: float) -> None:
        """Flush the sensory, then the STM buffers of this worker's users idle past the timeout."""
        t = self.kafka.topics
        caught_up = {
            p: self.delivery.caught_up(self.sensory_table, t.raw_turns, p)
            and self.delivery.caught_up(self.stm_table, t.segments, p)
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
        return idle.idle(row.seen_at or None, now_s, self.idle_s)

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
            row.pending = seqmarks.advance(row.pending, [t for s in segments for t in s.turns])
            self.sensory_table[key] = row.dump()
            log.info("idle flush of %s: %d segment(s) from the sensory buffer", user, len(segments))

    async def _flush_stm(self, key: bytes, now_s: float, now: datetime) -> None:
        user = key.decode()
        async with self._locks[key]:
            srow = self._sensory_row(key, user)
            row = STMRow.load(self.stm_table.get(key), user)
            decision = idle.decide(
                last_turn_s=srow.seen_at or None,
                now_s=now_s,
                idle_timeout_s=self.idle_s,
                sensory_turns=len(srow.state.turns),
                stm_segments=len(row.state.segments),
                pending=not row.took(srow.pending),  # turns the timer flushed have not reached STM yet
            )
            if srow.pending and row.took(srow.pending):
                srow.pending = {}
                self.sensory_table[key] = srow.dump()
            if not decision.flush_stm:
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
    shell = Shell(settings, stages or Stages(settings), **kwargs)
    install_crontab(shell)  # the nightly sleep-time requests
    return shell
