"""Topic creation through the real broker: idempotent, partitions from settings, configs as specified;
the producer keys by user id onto the partition the worker's tables use; the sink dead-letters bad records."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

import streams.kafka.topics as topics_mod
import tests.conftest as _root
from streams.kafka.produce import produce_raw
from streams.kafka.topics import (
    TopicReader,
    admin_client,
    end_offsets,
    ensure_topics,
    latest_per_key,
    partition_for,
    read_to_end,
    stop_consumer,
    topic_specs,
)
from tests.conftest_kafka import KafkaEnv, run_async
from tests.factories import raw_turn

if not hasattr(_root, "kafka_env"):  # until tests/conftest.py loads tests.conftest_kafka itself
    from tests.conftest_kafka import kafka_bootstrap, kafka_env, llm_proc, make_kafka_env  # noqa: F401

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


async def _configs(env: KafkaEnv, names: list[str]) -> dict[str, dict[str, str]]:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = admin_client(env.settings.kafka)
    await admin.start()
    try:
        resp = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        out: dict[str, dict[str, str]] = {}
        for r in resp:
            for res in r.to_object()["resources"]:
                out[res["resource_name"]] = {c["config_names"]: c["config_value"] for c in res["config_entries"]}
        return out
    finally:
        await admin.close()


def test_topics_created_idempotently_with_configs(kafka_env: KafkaEnv) -> None:
    k = kafka_env.settings.kafka
    first = run_async(ensure_topics(k))
    assert set(first.values()) == {"created"} and len(first) == 9
    again = run_async(ensure_topics(k))
    assert set(again.values()) == {"exists"}
    specs = {s.role: s for s in topic_specs(k)}
    names = [s.name for s in specs.values()]
    deadline = time.monotonic() + 30
    configs = run_async(_configs(kafka_env, names))
    # a topic's configs can read back empty for a moment after it was created: ask until every topic has them
    while not all(configs.get(n, {}).get("cleanup.policy") for n in names) and time.monotonic() < deadline:
        time.sleep(0.5)
        configs = run_async(_configs(kafka_env, names))
    raw = configs[k.topics.raw_turns]
    assert raw["cleanup.policy"] == "delete" and raw["retention.ms"] == "-1" and raw["retention.bytes"] == "-1"
    assert configs[k.topics.control]["cleanup.policy"] == "compact"
    assert configs[k.topics.dead_letters]["retention.ms"] == "-1"
    for purgeable in (k.topics.dead_letters, k.topics.memory_changes):  # kept forever, purged by tombstones
        assert configs[purgeable]["cleanup.policy"] == "compact"
    for s in specs.values():
        for key, value in s.config.items():
            assert configs[s.name][key] == value, (s.name, key)
    ends = run_async(end_offsets(k, [k.topics.raw_turns, k.topics.segments]))
    assert len(ends) == 2 * k.partitions


def test_producer_keys_turns_by_user_onto_murmur2_partition(kafka_env: KafkaEnv) -> None:
    turns = [raw_turn(u, "s1", i, f"turn {i} of {u}") for u in ("alice", "bob", "carol") for i in range(3)]
    assert kafka_env.produce(turns) == len(turns)
    records = kafka_env.read(kafka_env.topics.raw_turns)
    assert len(records) == len(turns)
    for r in records:
        user = json.loads(r.value)["user_id"]
        assert r.key == user.encode()
        assert r.partition == partition_for(r.key, kafka_env.settings.kafka.partitions)
    # one user's turns stay in order inside their partition
    for u in ("alice", "bob", "carol"):
        seqs = [json.loads(r.value)["seq"] for r in records if r.key == u.encode()]
        assert seqs == [0, 1, 2]


def test_sink_dead_letters_bad_records_and_commits(make_kafka_env: Any) -> None:
    env: KafkaEnv = make_kafka_env()
    env.create_topics()
    key = b"alice"
    change = {
        "change_id": "c1",
        "memory_id": "m1",
        "user_id": "alice",
        "action": "ignore",
        "model": "offline-rule",
        "pipeline_version": "x",
        "at": "2024-01-01T00:00:00+00:00",
    }
    env.produce_raw(env.topics.summaries, [(key, b"not json"), (key, None)])
    # changes are keyed per record (<user>/<change id>) so an erasure can tombstone them
    env.produce_raw(env.topics.memory_changes, [(b"alice/c1", json.dumps(change).encode()), (b"alice/c2", b"{}")])
    sink = env.sink()
    env.wait_sink_caught_up(timeout_s=90)
    assert sink.terminate() == 0, sink.tail()
    letters = env.dead_letters()
    assert sorted(d.error_type for d in letters) == ["InvalidJSON", "NullValue", "SchemaViolation"]
    assert all(d.stage == "sink" and d.key == "alice" for d in letters)
    # the valid change went to the apply hook, not to the dead letters


def test_topic_reader_reads_to_the_end_then_follows(kafka_env: KafkaEnv) -> None:
    """``read_to_end`` returns every record (tombstones included) up to the end offsets; a ``TopicReader`` kept
    open reads only what was appended since its previous read; ``latest_per_key`` applies tombstones."""
    kafka_env.create_topics()
    k = kafka_env.settings.kafka
    topic = k.topics.control
    first = [(f"user-{i}".encode(), f"v{i}".encode()) for i in range(12)]
    kafka_env.produce_raw(topic, first)

    async def main() -> tuple[list[Any], list[Any], list[Any], dict[bytes, Any]]:
        async with TopicReader(k, topic) as reader:
            before = await reader.read()
            more = [(b"user-0", None), (b"user-1", b"v1-again"), (b"user-99", b"new")]
            await produce_raw(k, topic, more)
            appended = await reader.read()
            nothing = await reader.read()
        return before, appended, nothing, latest_per_key(await read_to_end(k, topic))

    before, appended, nothing, table = run_async(main())
    assert sorted((r.key, r.value) for r in before) == sorted(first)
    assert sorted((r.key, r.value or b"") for r in appended) == [  # offset order per partition only
        (b"user-0", b""),
        (b"user-1", b"v1-again"),
        (b"user-99", b"new"),
    ]
    assert nothing == []
    assert b"user-0" not in table and table[b"user-1"].value == b"v1-again" and table[b"user-99"].value == b"new"
    assert len(table) == 12


def test_a_following_reader_keeps_what_was_appended_while_it_read(
    kafka_env: KafkaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records fetched past the end offsets a read took (appended meanwhile) come with the next read, not never:
    the erasure epochs follow the control topic with one reader kept open."""
    kafka_env.create_topics()
    k = kafka_env.settings.kafka
    topic = k.topics.control
    records = [(b"user-x", f"v{i}".encode()) for i in range(10)]  # one key: one partition, offsets 0..9
    kafka_env.produce_raw(topic, records)

    async def main() -> tuple[list[int], list[int], list[int]]:
        async with TopicReader(k, topic) as reader:
            real = topics_mod.stable_end_offsets

            async def only_four(consumer: Any, tps: Any) -> dict[Any, int]:  # as if 4..9 came after the call
                return {tp: min(off, 4) for tp, off in (await real(consumer, tps)).items()}

            monkeypatch.setattr(topics_mod, "stable_end_offsets", only_four)
            first = [r.offset for r in await reader.read()]
            monkeypatch.setattr(topics_mod, "stable_end_offsets", real)
            second = [r.offset for r in await reader.read()]
            third = [r.offset for r in await reader.read()]
        return first, second, third

    first, second, third = run_async(main())
    assert first == [0, 1, 2, 3]
    assert second == [4, 5, 6, 7, 8, 9]
    assert third == []


def test_a_reader_stopped_right_after_it_started_stops_cleanly(kafka_env: KafkaEnv) -> None:
    """aiokafka re-raises the cancellation of a group-less consumer's background task when it is stopped before
    that task first ran; ``stop_consumer`` finishes the stop and leaves the caller's task uncancelled."""

    async def start_stop() -> tuple[int, bool]:
        raised = 0
        closed = True
        for _ in range(5):
            consumer = AIOKafkaConsumer(bootstrap_servers=kafka_env.settings.kafka.bootstrap_servers)
            await consumer.start()
            await stop_consumer(consumer)
            closed = closed and consumer._closed and not consumer._client._conns
            try:
                await asyncio.sleep(0)  # a task left cancelled would raise here
            except asyncio.CancelledError:
                raised += 1
        return raised, closed

    assert run_async(start_stop()) == (0, True)
