"""The streaming shell without a broker: keys and partitions, topic specs, table rows, the delivery-order
check, dead letters of consumed records, replay settings. (The broker layer is in test_kafka_pipeline.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from schemas.records import SensoryBufferState, STMBufferState
from streams.kafka.app import Shell
from streams.kafka.delivery import RESEEK_S
from streams.kafka.replay import replay_settings
from streams.kafka.tables import SensoryRow, STMRow, progress_key
from streams.kafka.topics import key_of, message_dead_letter, partition_for, sink_group_id, topic_specs
from streams.settings import KafkaSettings, Settings
from tests.factories import compressed_turn


@pytest.mark.parametrize("key", [b"alice", b"conv-30", "ünïcode-user".encode(), b"x" * 200, b"user-7"])
@pytest.mark.parametrize("partitions", [1, 4, 12])
def test_partition_for_matches_the_producers_partitioner(key: bytes, partitions: int) -> None:
    parts = list(range(partitions))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, parts, parts)


def test_topic_specs_follow_settings() -> None:
    k = KafkaSettings(partitions=6, app_id="x")
    specs = {s.role: s for s in topic_specs(k)}
    assert set(specs) == {
        "raw_turns",
        "segments",
        "summaries",
        "memory_changes",
        "compaction_requests",
        "dead_letters",
        "control",
        "keys",
        "watermarks",
    }
    assert {s.name for s in specs.values()} == set(k.topics.model_dump().values())
    assert all(s.partitions == 6 for s in specs.values())
    raw = specs["raw_turns"].config
    assert raw == {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}  # the log of record
    assert specs["control"].config["cleanup.policy"] == "compact"
    assert sink_group_id(k) == "x-ltm-sink"
    assert key_of("alice") == b"alice" and key_of(None) is None


def test_rows_round_trip() -> None:
    t = compressed_turn("alice", 0, "hello there")
    row = SensoryRow(SensoryBufferState(user_id="alice", turns=[t], encoder_tokens=3), 41, 123.5, {"s1": 4})
    back = SensoryRow.load(row.dump(), "alice")
    assert back == row
    assert SensoryRow.load(None, "bob").state == SensoryBufferState(user_id="bob")
    srow = STMRow(STMBufferState(user_id="alice"), 7, ["a", "b"])
    assert STMRow.load(srow.dump(), "alice") == srow
    assert srow.knows("a") and not srow.knows("c")
    assert srow.took({}) and not srow.took({"s1": 0})


@pytest.fixture
def shell(tmp_path: Path) -> Shell:
    return Shell(Settings(data_dir=tmp_path, kafka=KafkaSettings(partitions=4)), SimpleNamespace())  # type: ignore[arg-type]


def test_tables_write_to_the_users_partition(shell: Shell) -> None:
    for table in (shell.sensory_table, shell.stm_table):
        assert table.partition_for_key(b"alice") == partition_for(b"alice", 4)
        assert table.partition_for_key(progress_key(3)) == 3  # progress rows live in their own partition


class FakeConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[Any, int]] = []
        self.log_start = 0

    async def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def earliest_offsets(self, *tps: Any) -> dict[Any, int]:
        return {tp: self.log_start for tp in tps}


def _msg(shell: Shell, offset: int, partition: int = 2) -> Any:
    return SimpleNamespace(topic=shell.kafka.topics.raw_turns, partition=partition, offset=offset)


async def test_delivery_order_check_seeks_back_over_a_gap(shell: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = FakeConsumer()
    shell.app.consumer = consumer  # type: ignore[misc]
    table = shell.sensory_table
    assert await shell.delivery.in_order(_msg(shell, 0), table)
    assert await shell.delivery.in_order(_msg(shell, 1), table)
    assert not await shell.delivery.in_order(_msg(shell, 1), table)  # a redelivery of a handled record is skipped
    assert shell.stats.redeliveries == 1
    # offset 2 never arrived: 4 is dropped and the partition sought back to 2, once
    assert not await shell.delivery.in_order(_msg(shell, 4), table)
    assert not await shell.delivery.in_order(_msg(shell, 5), table)
    assert [o for _, o in consumer.seeks] == [2]
    assert shell.stats.reseeks == 1
    # the re-fetch arrives in order
    for offset in (2, 3, 4, 5):
        assert await shell.delivery.in_order(_msg(shell, offset), table)
    # other partitions are independent
    assert await shell.delivery.in_order(_msg(shell, 0, partition=1), table)
    # a gap still there long after the seek is sought back again, never skipped while the broker holds it
    assert not await shell.delivery.in_order(_msg(shell, 9), table)
    tp, sought = next((k, v) for k, v in shell.delivery.sought.items() if k.partition == 2)
    shell.delivery.sought[tp] = (sought[0], sought[1] - RESEEK_S - 1)
    assert not await shell.delivery.in_order(_msg(shell, 9), table)
    assert [o for _, o in consumer.seeks] == [2, 6, 6]
    # ... and accepted only once retention deleted it (the log start moved past it)
    consumer.log_start = 8
    shell.delivery.sought[tp] = (sought[0], sought[1] - RESEEK_S - 1)
    assert not await shell.delivery.in_order(_msg(shell, 9), table)  # 8 still exists: sought back to it
    assert consumer.seeks[-1][1] == 8
    assert await shell.delivery.in_order(_msg(shell, 8), table)
    assert await shell.delivery.in_order(_msg(shell, 9), table)


def test_dead_letter_of_a_consumed_record_keeps_the_bytes_and_origin() -> None:
    rec = SimpleNamespace(topic="t.raw", partition=3, offset=17, key=b"alice", value=b"\xff{not json")
    d = message_dead_letter(rec, "ingest", "bad", "InvalidJSON")
    assert d.payload.encode("latin-1") == rec.value
    assert d.key == "alice" and d.stage == "ingest" and "t.raw[3]@17" in d.reason


def test_replay_settings_switch_collection_and_embedder(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    r = replay_settings(s, "rebuilt", tmp_path / "model")
    assert r.store.collection == "rebuilt" and r.embedding.model == str(tmp_path / "model")
    assert replay_settings(s, "rebuilt").embedding == s.embedding
    assert s.store.collection != "rebuilt"  # the original settings are untouched
