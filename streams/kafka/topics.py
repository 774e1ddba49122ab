"""Topics of the pipeline: names and partitions from ``settings.kafka``, configs, idempotent creation.

Every topic is keyed by the user id (UTF-8 bytes), so one user's records stay ordered in one partition
and the worker that owns a user's raw-turn partition also owns its segment partition and both of its
table changelog partitions (same partition count → Faust co-partitions them).

| role                | record            | cleanup | retention                                   |
|---------------------|-------------------|---------|---------------------------------------------|
| raw_turns           | RawTurn           | delete  | forever (-1 ms, -1 bytes): the log of record |
| segments            | TopicSegment      | delete  | 7 days (derived, rebuilt by replay)          |
| summaries           | STMSummary        | delete  | 30 days (derived)                           |
| memory_changes      | MemoryChange      | compact | forever, key ``<user>/<change id>``: audit log |
| compaction_requests | CompactionRequest | delete  | 7 days                                      |
| dead_letters        | DeadLetter        | compact | forever, key ``<user>/<dlq id>``: nothing silent |
| control             | ControlRecord     | compact | latest command per user kept                |
| keys                | UserKey           | compact | key ``<user>/<key id>``; tombstoned on erasure |
| watermarks          | WatermarkRecord   | compact | latest compaction watermark per user        |

The erasure barrier (a ``ControlRecord`` ``erase_user``) also travels in-band through raw turns → segments →
summaries (``TopicSpec.also``), ordered with the user's records; see ``streams.kafka.erasure``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from schemas.records import (
    CompactionRequest,
    ControlRecord,
    DeadLetter,
    MemoryChange,
    RawTurn,
    Record,
    STMSummary,
    TopicSegment,
    UserKey,
    WatermarkRecord,
)
from streams.dlq import dead_letter
from streams.settings import KafkaSettings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
FOREVER = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
# kept forever, one key per record ("<user>/<record id>"), so an erasure can remove a user's records with
# tombstones (read back as "latest value per key", a tombstoned record is gone at once; compaction then
# deletes the bytes)
PURGEABLE = {
    "cleanup.policy": "compact",
    "retention.ms": "-1",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": str(DAY_MS),
}


@dataclass(frozen=True)
class TopicSpec:
    role: str
    name: str
    partitions: int
    replication: int
    record: type[Record]
    config: dict[str, str] = field(default_factory=dict)
    also: tuple[type[Record], ...] = ()  # in-band records the topic carries too (the erasure barrier)
    per_record_key: bool = False  # key "<user>/<record id>" (purgeable topics) instead of the user id


def topic_specs(kafka: KafkaSettings) -> list[TopicSpec]:
    """The pipeline's topics with their configs (see the module table)."""
    t = kafka.topics
    p, r = kafka.partitions, kafka.replication_factor

    def spec(
        role: str, name: str, record: type[Record], config: dict[str, str], also: tuple[type[Record], ...] = ()
    ) -> TopicSpec:
        return TopicSpec(role, name, p, r, record, dict(config), also)

    barrier = (ControlRecord,)
    return [
        spec("raw_turns", t.raw_turns, RawTurn, FOREVER, barrier),
        spec(
            "segments",
            t.segments,
            TopicSegment,
            {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
            barrier,
        ),
        spec(
            "summaries",
            t.summaries,
            STMSummary,
            {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
            barrier,
        ),
        TopicSpec("memory_changes", t.memory_changes, p, r, MemoryChange, dict(PURGEABLE), per_record_key=True),
        spec(
            "compaction_requests",
            t.compaction_requests,
            CompactionRequest,
            {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
        ),
        TopicSpec("dead_letters", t.dead_letters, p, r, DeadLetter, dict(PURGEABLE), per_record_key=True),
        TopicSpec("keys", t.keys, p, r, UserKey, dict(PURGEABLE), per_record_key=True),
        spec("watermarks", t.watermarks, WatermarkRecord, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
        spec("control", t.control, ControlRecord, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
    ]


# -- keys and values ---------------------------------------------------------------------------------


def key_of(user_id: str | None) -> bytes | None:
    return None if user_id is None else user_id.encode("utf-8")


def spec_of(kafka: KafkaSettings, role: str) -> TopicSpec:
    return next(s for s in topic_specs(kafka) if s.role == role)


def record_key(user_id: str | None, record_id: str) -> bytes:
    """Key of a record on a purgeable topic (changes, dead letters): ``<user>/<record id>``."""
    return f"{user_id or ''}/{record_id}".encode()


def user_of_record_key(key: bytes | None) -> str | None:
    if not key or b"/" not in key:
        return None
    user = key.rsplit(b"/", 1)[0].decode("utf-8", "replace")
    return user or None


def keyed_send(user_id: str | None, record_id: str, partitions: int) -> dict[str, Any]:
    """``send`` arguments for a purgeable topic: the per-record key, in the user's partition (ordered per user)."""
    part = partition_for(key_of(user_id) or b"", partitions) if user_id is not None else None
    return {"key": record_key(user_id, record_id), "partition": part}


def dumps(record: Record) -> bytes:
    return record.model_dump_json().encode("utf-8")


def validation_reason(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])


def validation_kind(exc: ValidationError) -> str:
    return "InvalidJSON" if any(e["type"] == "json_invalid" for e in exc.errors()) else "SchemaViolation"


def message_dead_letter(msg: Any, stage: str, reason: str, error_type: str) -> DeadLetter:
    """A dead letter for a consumed record (Faust message or aiokafka record): original bytes and origin."""
    key = msg.key.decode("utf-8", "replace") if isinstance(msg.key, bytes) else None
    value = msg.value if isinstance(msg.value, bytes | str) else b""
    return dead_letter(stage, f"{reason} ({msg.topic}[{msg.partition}]@{msg.offset})", error_type, value, key)


def error_dead_letter(msg: Any, stage: str, exc: BaseException) -> DeadLetter:
    return message_dead_letter(msg, stage, str(exc) or type(exc).__name__, type(exc).__name__)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as aiokafka and the Java client) picks for a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def make_producer(kafka: KafkaSettings, *, client_id: str | None = None) -> AIOKafkaProducer:
    """The idempotent producer every sender uses (``acks=all``: a retried send is not written twice)."""
    return AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=client_id or f"{kafka.app_id}-producer",
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
    )


# -- admin ------------------------------------------------------------------------------------------


def admin_client(kafka: KafkaSettings, *, request_timeout_ms: int = 30000) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=f"{kafka.app_id}-admin",
        request_timeout_ms=request_timeout_ms,
    )


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the configured bootstrap servers."""


async def broker_available(bootstrap_servers: str, timeout_s: float = 5.0) -> bool:
    """True when a broker answers a metadata request within ``timeout_s``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.describe_cluster(), timeout_s)
        return True
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        try:
            await admin.close()
        except Exception:  # noqa: BLE001 - closing a client that never connected
            pass


async def ensure_topics(
    kafka: KafkaSettings, specs: Sequence[TopicSpec] | None = None, *, timeout_s: float = 30.0
) -> dict[str, str]:
    """Create the missing topics with their configs; returns ``{name: "created" | "exists"}``.

    Idempotent: existing topics are left alone (a warning when their partition count differs from the
    settings; an error when raw turns and segments differ, since the worker needs them co-partitioned).
    """
    specs = list(specs if specs is not None else topic_specs(kafka))
    admin = admin_client(kafka, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (TimeoutError, KafkaConnectionError, OSError) as exc:
        raise BrokerUnavailable(f"no Kafka broker answers at {kafka.bootstrap_servers}: {exc!r}") from exc
    result: dict[str, str] = {}
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        for s in specs:
            if s.name in existing:
                result[s.name] = "exists"
        if missing:
            resp = await admin.create_topics(
                [NewTopic(s.name, s.partitions, s.replication, topic_configs=s.config) for s in missing],
                timeout_ms=int(timeout_s * 1000),
            )
            for item in resp.topic_errors:
                name, code = item[0], item[1]
                reason = item[2] if len(item) > 2 else ""
                if code == 0:
                    result[name] = "created"
                    log.info("created topic %s", name)
                elif code == TopicAlreadyExistsError.errno:
                    result[name] = "exists"
                else:
                    raise for_code(code)(f"cannot create topic {name}: {reason}")
        await _check_partitions(admin, kafka, specs)
    finally:
        await admin.close()
    return result


async def _check_partitions(admin: AIOKafkaAdminClient, kafka: KafkaSettings, specs: Sequence[TopicSpec]) -> None:
    described = await admin.describe_topics([s.name for s in specs])
    counts = {t["topic"]: len(t["partitions"]) for t in described if not t.get("error_code")}
    for s in specs:
        n = counts.get(s.name)
        if n is not None and n != s.partitions:
            log.warning("topic %s has %d partitions, settings say %d", s.name, n, s.partitions)
    raw, seg = counts.get(kafka.topics.raw_turns), counts.get(kafka.topics.segments)
    if raw is not None and seg is not None and raw != seg:
        raise RuntimeError(
            f"{kafka.topics.raw_turns} has {raw} partitions but {kafka.topics.segments} has {seg}: the worker "
            "needs them co-partitioned (same count)"
        )


async def topic_partition_counts(kafka: KafkaSettings, names: Sequence[str]) -> dict[str, int]:
    admin = admin_client(kafka)
    await admin.start()
    try:
        described = await admin.describe_topics(list(names))
        return {t["topic"]: len(t["partitions"]) for t in described if not t.get("error_code")}
    finally:
        await admin.close()


async def delete_topics(kafka: KafkaSettings, names: Sequence[str]) -> None:
    """Delete topics that exist (tests and tooling)."""
    admin = admin_client(kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        todo = [n for n in names if n in existing]
        if todo:
            await admin.delete_topics(todo)
    finally:
        await admin.close()


# -- consumer groups and lag ------------------------------------------------------------------------


def sink_group_id(kafka: KafkaSettings) -> str:
    """Consumer group of the LTM sink (derived from the app id, so one setting isolates a deployment)."""
    return f"{kafka.app_id}-ltm-sink"


async def partitions_of(kafka: KafkaSettings, topics: Sequence[str]) -> dict[str, int]:
    """Partition count of each existing topic, from the admin client's metadata request for those topics.

    (An unsubscribed aiokafka consumer's ``partitions_for_topic`` is unreliable against Kafka 4: its
    metadata requests name no topics, and an empty list means "none" in current protocol versions.)
    """
    return await topic_partition_counts(kafka, topics)


async def assign_and_refresh(consumer: Any, tps: Sequence[Any]) -> None:
    """Assign partitions to a group-less consumer and load their metadata before asking for offsets.

    Without it, a fresh consumer's ``end_offsets`` for topics it has no metadata for can answer 0.
    """
    consumer.assign(list(tps))
    await consumer._client.force_metadata_update()  # noqa: SLF001 - metadata of the assigned topics, now


async def stable_end_offsets(consumer: Any, tps: Sequence[Any], tries: int = 10) -> dict[Any, int]:
    """End offsets, asked until two answers agree: a partition whose leadership is still settling (just
    after the topic was created) can briefly answer 0."""
    end = await consumer.end_offsets(list(tps))
    for _ in range(tries):
        await asyncio.sleep(0.1)
        again = await consumer.end_offsets(list(tps))
        if again == end:
            break
        end = {tp: max(end[tp], again[tp]) for tp in tps}
    return dict(end)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, minus an aiokafka race: a group-less consumer stopped before its background
    reset-committed task first ran re-raises that task's cancellation as a ``CancelledError`` of its own (seen
    once in CI on a reader of an empty topic). Swallowed only when this task itself is not being cancelled."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.debug("consumer stopped before its reset-committed task ran (aiokafka); closing the rest")
        # what stop() had left to do after the coordinator (aiokafka 0.14): the fetcher, then the client
        if consumer._fetcher is not None:
            await consumer._fetcher.close()
        await consumer._client.close()


async def end_offsets(kafka: KafkaSettings, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """Log-end offset of every partition of the topics (those that exist)."""
    counts = await partitions_of(kafka, topics)
    tps = [TopicPartition(t, p) for t in topics for p in range(counts.get(t, 0))]
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        await assign_and_refresh(consumer, tps)
        ends = await stable_end_offsets(consumer, tps)
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        await stop_consumer(consumer)


async def committed_offsets(kafka: KafkaSettings, group_id: str) -> dict[tuple[str, int], int]:
    admin = admin_client(kafka)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(group_id)
        return {(tp.topic, tp.partition): om.offset for tp, om in got.items() if om.offset >= 0}
    finally:
        await admin.close()


async def consumer_lag(kafka: KafkaSettings, group_id: str, topics: Sequence[str]) -> dict[str, int]:
    """Per topic: records not yet committed by the group (end offset − committed offset, summed)."""
    ends = await end_offsets(kafka, topics)
    done = await committed_offsets(kafka, group_id)
    lag: dict[str, int] = {t: 0 for t in topics}
    for (topic, part), end in ends.items():
        lag[topic] += max(0, end - done.get((topic, part), 0))
    return lag


async def group_members(kafka: KafkaSettings, group_id: str) -> int:
    """Members of a consumer group (0 when it has none or does not exist)."""
    admin = admin_client(kafka)
    await admin.start()
    try:
        resp = await admin.describe_consumer_groups([group_id])
        total = 0
        for r in resp:
            for g in r.to_object()["groups"]:
                if g.get("state", g.get("group_state")) == "Stable":
                    total += len(g["members"])
        return total
    finally:
        await admin.close()


# -- reading a topic to its end ---------------------------------------------------------------------


class TopicReader:
    """A group-less consumer assigned to every partition of one topic, read from the beginning.

    ``batches()`` yields the records from where the reader stands up to the end offsets of the moment it is
    called (records appended meanwhile wait for the next call), in offset order per partition. A reader kept
    open follows the topic: each ``batches()`` reads only what was appended since the previous one. Nothing is
    committed. A topic that does not exist reads as empty (``partitions == 0``).
    """

    def __init__(self, kafka: KafkaSettings, topic: str, *, client_id: str | None = None) -> None:
        self.kafka = kafka
        self.topic = topic
        self.client_id = client_id or f"{kafka.app_id}-reader"
        self.partitions = 0
        self.begin: dict[int, int] = {}  # where the first batches() started (the log start offsets)
        self.end: dict[int, int] = {}  # the end offsets the latest batches() read up to
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []

    async def start(self) -> None:
        self.partitions = (await partitions_of(self.kafka, [self.topic])).get(self.topic, 0)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            client_id=self.client_id,
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        self._consumer = consumer
        self._tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        if self._tps:
            await assign_and_refresh(consumer, self._tps)
            # no beginning_offsets() here: asked between assign and seek, it made the first read come back empty
            # now and then (aiokafka); the first batches() takes the beginning from the positions instead
            await consumer.seek_to_beginning(*self._tps)

    async def stop(self) -> None:
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None

    async def __aenter__(self) -> TopicReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def batches(
        self, *, timeout_s: float | None = None, max_records: int | None = None
    ) -> AsyncIterator[list[Any]]:
        """The records up to the current end offsets, a fetched batch at a time (aiokafka ``ConsumerRecord``\\ s,
        tombstones included); ``TimeoutError`` when the end is not reached within ``timeout_s``."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("TopicReader.batches() before start()")
        if not self._tps:
            return
        # just after start a partition whose leadership is settling can answer 0: ask until two answers agree
        end = await (consumer.end_offsets(self._tps) if self.end else stable_end_offsets(consumer, self._tps))
        self.end = {tp.partition: off for tp, off in end.items()}
        position = {tp: await consumer.position(tp) for tp in self._tps}
        if not self.begin:
            self.begin = {tp.partition: off for tp, off in position.items()}
        remaining = {tp for tp in self._tps if position[tp] < end[tp]}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while remaining:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self.topic} to its end offsets {self.end} within {timeout_s} s")
            got = await consumer.getmany(*remaining, timeout_ms=500, max_records=max_records)
            out = [r for tp, recs in got.items() for r in recs if r.offset < end[tp]]
            for tp, recs in got.items():
                if recs and recs[-1].offset >= end[tp]:
                    # appended after the end offsets were taken: not this call's, but the next one's (a reader
                    # kept open follows the topic), so go back to the end rather than past them
                    consumer.seek(tp, end[tp])
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            if out:
                yield out

    async def read(self, *, timeout_s: float | None = 60.0) -> list[Any]:
        """Every record up to the current end offsets (see ``batches``)."""
        return [r async for batch in self.batches(timeout_s=timeout_s) for r in batch]


async def read_to_end(kafka: KafkaSettings, topic: str, *, timeout_s: float | None = 60.0) -> list[Any]:
    """Every record of a topic from the beginning to its end offsets at the call (tombstones included)."""
    async with TopicReader(kafka, topic) as reader:
        return await reader.read(timeout_s=timeout_s)


def latest_per_key(records: Sequence[Any]) -> dict[bytes, Any]:
    """A compacted topic read as a table: the latest record per key; a tombstone removes its key."""
    out: dict[bytes, Any] = {}
    for r in records:
        if r.key is None:
            continue
        if r.value is None:
            out.pop(r.key, None)
        else:
            out[r.key] = r
    return out


async def latest_by_key(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> dict[bytes, Any]:
    """The latest record per key of a topic (a compacted topic read as a table; tombstones remove keys)."""
    return latest_per_key(await read_to_end(kafka, topic, timeout_s=timeout_s))
