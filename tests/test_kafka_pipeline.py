"""Integration tests through the real Kafka broker: workers and the sink run as ``lightmem`` subprocesses
against the OpenAI-compatible test server (standalone), each test on its own topics and app id.

(a) a LoCoMo slice produced → worker → sink gives the same memory ids and texts as the embedded pipeline;
(b) two workers share the partitions of several users: no loss, no duplicate;
(c) a worker killed with SIGKILL mid-stream and restarted recovers its tables and ends with the same memories;
(d) replay of the raw-turn topic into a new collection reproduces the ids;
(e) malformed records (bad JSON, JSON failing the schema) land in the dead-letter topic with stage and
    reason, and the records after them are still processed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import tests.conftest as _root
from schemas.records import RawTurn
from streams.extract import participant_names, states_something
from streams.kafka.topics import partition_for
from tests.conftest_kafka import (
    KafkaEnv,
    LLMProcess,
    embedded_in_background,
    memories_from_summaries,
    store_memories,
)
from tests.faults.common import rekey, sessions_of

if not hasattr(_root, "kafka_env"):  # until tests/conftest.py loads tests.conftest_kafka itself
    from tests.conftest_kafka import kafka_bootstrap, kafka_env, llm_proc, make_kafka_env  # noqa: F401

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]

BAD_JSON = b'{"turn_id": "x", "user_id": "conv-30", '
BAD_SCHEMA = json.dumps(
    {
        "turn_id": "y",
        "user_id": "conv-30",
        "session_id": "session_1",
        "seq": -1,
        "role": "user",
        "content": "a turn with a negative seq and a naive timestamp",
        "timestamp": "2023-05-08T13:56:00",
    }
).encode()
BAD_SUMMARY = b'{"schema_version": 1, "summary_id": "not-a-summary"}'


def users_on_distinct_partitions(n: int, partitions: int) -> list[str]:
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < n:
        u = f"user-{i}"
        chosen.setdefault(partition_for(u.encode(), partitions), u)
        i += 1
    return list(chosen.values())


def conversation(conversations: Any, suffix: str) -> list[RawTurn]:
    return next(c for c in conversations if c.user_id.endswith(suffix)).turns


# -- (a) (d) (e): one LoCoMo run, shared -----------------------------------------------------------------
@pytest.fixture(scope="module")
def locomo_run(
    kafka_bootstrap: str, llm_proc: LLMProcess, locomo_conversations: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    turns = sessions_of(conversation(locomo_conversations, "conv-30"), 3)
    env = KafkaEnv.create(kafka_bootstrap, llm_proc.url, tmp_path_factory.mktemp("locomo"))
    try:
        env.create_topics()
        worker = env.worker()
        sink = env.sink()
        reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
        user_key = turns[0].user_id.encode()
        # (e): a record that is not JSON and one that fails the RawTurn schema, BEFORE the conversation
        env.produce_raw(env.topics.raw_turns, [(user_key, BAD_JSON), (user_key, BAD_SCHEMA)])
        env.produce(turns)
        env.produce_raw(env.topics.summaries, [(user_key, BAD_SUMMARY)])
        t0 = time.monotonic()
        summaries = env.wait_summaries_cover([t.turn_id for t in turns])
        env.wait_sink_caught_up()
        elapsed = time.monotonic() - t0
        assert sink.terminate() == 0, sink.tail()  # graceful: the store is closed before we open it
        worker.terminate()
        kafka_mem = store_memories(env.settings, {t.user_id for t in turns})
        expected = reference.result(timeout=300)
        yield {
            "env": env,
            "turns": turns,
            "summaries": summaries,
            "kafka": kafka_mem,
            "embedded": expected,
            "seconds": elapsed,
            "worker_log": worker.log(),
            "sink_log": sink.log(),
        }
    finally:
        env.close()


def test_locomo_through_kafka_matches_embedded(locomo_run: dict[str, Any]) -> None:
    kafka, embedded = locomo_run["kafka"], locomo_run["embedded"]
    assert len(embedded) > 10
    assert set(kafka) == set(embedded), (
        f"only via Kafka: {sorted(set(kafka) - set(embedded))[:5]}, only embedded: "
        f"{sorted(set(embedded) - set(kafka))[:5]}"
    )
    assert kafka == embedded  # same ids, same kinds, same texts
    # every turn of the input that states something is the source of a fact (small talk is not a fact)
    sources = {t for s in locomo_run["summaries"] for f in s.facts for t in f.source_turn_ids}
    names = participant_names({t.speaker or t.role for t in locomo_run["turns"]})
    stating = {t.turn_id for t in locomo_run["turns"] if states_something(t.content, names)}
    assert stating and stating <= sources


def test_malformed_records_are_dead_lettered(locomo_run: dict[str, Any]) -> None:
    env: KafkaEnv = locomo_run["env"]
    letters = env.dead_letters()
    ingest = [d for d in letters if d.stage == "ingest"]
    assert len(ingest) == 2, letters
    by_payload = {d.payload.encode("latin-1"): d for d in ingest}
    assert set(by_payload) == {BAD_JSON, BAD_SCHEMA}  # the original bytes, verbatim
    bad_json, bad_schema = by_payload[BAD_JSON], by_payload[BAD_SCHEMA]
    assert bad_json.error_type == "InvalidJSON" and bad_json.key == "conv-30"
    assert bad_schema.error_type == "SchemaViolation"
    assert "seq" in bad_schema.reason and "timestamp" in bad_schema.reason
    assert f"{env.topics.raw_turns}[" in bad_json.reason  # where it came from
    sink = [d for d in letters if d.stage == "sink"]
    assert len(sink) == 1 and sink[0].payload.encode() == BAD_SUMMARY and sink[0].error_type == "SchemaViolation"
    # the records after the bad ones were processed (test (a) checks they were processed right)
    assert locomo_run["summaries"]


def test_replay_into_new_collection_reproduces_ids(locomo_run: dict[str, Any]) -> None:
    env: KafkaEnv = locomo_run["env"]
    out = env.run_cli("replay", "--collection", "replayed")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 dead letters" in out.stdout, out.stdout
    users = {t.user_id for t in locomo_run["turns"]}
    replayed = store_memories(env.settings, users, collection="replayed")
    assert replayed == locomo_run["kafka"]
    # the original collection is untouched and a second replay into the same collection is refused
    assert store_memories(env.settings, users) == locomo_run["kafka"]
    again = env.run_cli("replay", "--collection", "replayed")
    assert again.returncode != 0 and "already holds" in again.stderr + again.stdout


# -- (b) two workers ------------------------------------------------------------------------------------
def test_two_workers_share_partitions(make_kafka_env: Any, locomo_conversations: Any) -> None:
    env: KafkaEnv = make_kafka_env()
    users = users_on_distinct_partitions(4, env.settings.kafka.partitions)
    sources = ["conv-26", "conv-30", "conv-41", "conv-42"]
    turns: list[RawTurn] = []
    for user, src in zip(users, sources, strict=True):
        turns.extend(rekey(sessions_of(conversation(locomo_conversations, src), 1), user))
    env.create_topics()
    w1, w2 = env.worker("worker-1"), env.worker("worker-2")
    reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
    env.wait_group_members(2)
    env.produce(turns)
    summaries = env.wait_summaries_cover([t.turn_id for t in turns])
    time.sleep(3)  # let any straggling duplicate show up before counting
    summaries = env.summaries()
    counts = Counter(s.summary_id for s in summaries)
    assert max(counts.values()) == 1, f"duplicate summaries: {[k for k, v in counts.items() if v > 1]}"
    # no turn in two batches, none lost
    turn_count = Counter(t for s in summaries for t in s.turn_ids)
    assert set(turn_count) == {t.turn_id for t in turns} and max(turn_count.values()) == 1
    # both workers did part of the work
    for w in (w1, w2):
        assert "idle flush of user-" in w.log(), w.tail()
    got = memories_from_summaries(summaries, env.settings.pipeline_version)
    assert got == reference.result(timeout=300)


# -- (c) crash and recovery -----------------------------------------------------------------------------
def test_worker_sigkill_recovers_from_changelogs(
    make_kafka_env: Any, locomo_conversations: Any, llm_proc: LLMProcess
) -> None:
    env: KafkaEnv = make_kafka_env()
    users = users_on_distinct_partitions(2, env.settings.kafka.partitions)
    turns = rekey(sessions_of(conversation(locomo_conversations, "conv-26"), 2), users[0]) + rekey(
        sessions_of(conversation(locomo_conversations, "conv-43"), 2), users[1]
    )
    env.create_topics()
    llm_proc.control("/control/config", {"latency_s": 0.7})  # slow extraction: the kill lands mid-stream
    worker = env.worker("worker-1")
    reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
    env.produce(turns)
    env.wait_for("a first summary", lambda: len(env.summaries()) >= 1, 120, every_s=0.3)
    before = env.summaries()
    assert not {t.turn_id for t in turns} <= {t for s in before for t in s.turn_ids}, "too late: all done"
    worker.kill()
    llm_proc.control("/control/config", {"latency_s": 0.0})
    restarted = env.worker("worker-2")
    summaries = env.wait_summaries_cover([t.turn_id for t in turns], timeout_s=180)
    time.sleep(3)
    summaries = env.summaries()
    assert "Recovery" in restarted.log() or "recover" in restarted.log().lower(), restarted.tail()
    distinct = {s.summary_id: s for s in summaries}
    turn_count = Counter(t for s in distinct.values() for t in s.turn_ids)
    assert max(turn_count.values()) == 1, "a turn went into two different batches after the restart"
    got = memories_from_summaries(distinct.values(), env.settings.pipeline_version)
    expected = reference.result(timeout=300)
    assert set(got) == set(expected)
    assert got == expected
