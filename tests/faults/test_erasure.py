"""R7: one user erased mid-stream over Kafka. Afterwards nothing of what they said before the erasure is left in
the store, the worker tables (read back from their changelog topics), the memory changes, the dead letters, or a
replay of the raw-turn log; what they say after the erasure is kept, and the other user is untouched.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.records import RawTurn
from streams.dlq import DeadLetterLog
from streams.kafka.erasure import produce_erasure, user_records
from streams.kafka.produce import produce_records
from streams.kafka.topics import latest_by_key
from tests.conftest_kafka import (
    KafkaEnv,
    LLMProcess,
    embedded_in_background,
    memories_from_summaries,
    run_async,
    store_memories,
)
from tests.faults.common import compare, conversation, rekey, sessions_of, summary, users_on_distinct_partitions

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(600)]


def _split_sessions(turns: list[RawTurn]) -> tuple[list[RawTurn], list[RawTurn]]:
    first = turns[0].session_id
    return [t for t in turns if t.session_id == first], [t for t in turns if t.session_id != first]


def test_erasure_mid_stream_leaves_nothing(make_kafka_env: Any, locomo_conversations: Any, llm_proc: LLMProcess):
    env: KafkaEnv = make_kafka_env()
    erased, kept = users_on_distinct_partitions(2, env.settings.kafka.partitions)
    before, after = _split_sessions(rekey(sessions_of(conversation(locomo_conversations, "conv-26"), 2), erased))
    other = rekey(sessions_of(conversation(locomo_conversations, "conv-30"), 1), kept)
    env.create_topics()
    ref_after = embedded_in_background(env.settings, after, env.data_dir / "embedded-after")
    ref_other = embedded_in_background(env.settings, other, env.data_dir / "embedded-other")
    llm_proc.control("/control/config", {"latency_s": 0.5})  # extraction in flight when the erasure comes
    worker = env.worker("worker-1")
    sink = env.sink()
    # a bad record of the erased user: a dead letter holding their text
    bad = json.dumps({"user_id": erased, "content": "my secret is 1234"}).encode()
    env.produce_raw(env.topics.raw_turns, [(erased.encode(), bad)])
    env.produce(before + other)
    env.wait_for("a first summary of the user", lambda: any(s.user_id == erased for s in env.summaries()), 180, 0.3)
    run_async(produce_erasure(env.settings, erased))
    llm_proc.control("/control/config", {"latency_s": 0.0})
    env.produce(after)  # the user comes back after the erasure
    env.wait_summaries_cover([t.turn_id for t in after + other], timeout_s=300)
    env.wait_sink_caught_up()
    k = env.settings.kafka
    doomed = {t.turn_id for t in before}
    # tables, read back from their changelogs: no row holds a turn said before the erasure
    for table in ("sensory", "stm"):
        rows = run_async(latest_by_key(k, f"{env.name}-{table}-changelog"))
        leaked = [key for key, r in rows.items() if any(tid.encode() in r.value for tid in doomed)]
        assert not leaked, f"{table} rows still hold erased turns: {leaked}"
    # the raw-turn log still holds the user's turns, sealed, and their keys are gone: unreadable (crypto-shredding)
    raw = [json.loads(r.value) for r in env.read(k.topics.raw_turns) if r.key == erased.encode()]
    sealed = [v for v in raw if v.get("turn_id") in doomed]
    assert len(sealed) == len(before) and all(v["sealed"] and not v["content"] for v in sealed)
    live = {json.loads(r.value)["key_id"] for r in run_async(user_records(k, k.topics.keys, erased))}
    assert not live & {v["key_id"] for v in sealed}  # the keys that sealed them are tombstoned
    assert live, "the user came back after the erasure: a new key seals their new turns"
    assert run_async(user_records(k, k.topics.keys, kept))  # the other user's key stays
    # changes and dead letters of the user are tombstoned; the bad record was dead-lettered first
    assert not run_async(user_records(k, k.topics.dead_letters, erased))
    assert not run_async(user_records(k, k.topics.memory_changes, erased))
    written = [r for r in env.read(k.topics.dead_letters) if r.key.startswith(f"{erased}/".encode()) and r.value]
    assert written, "the bad record never reached the dead letters"
    assert all(d.key != erased for d in env.dead_letters())
    assert sink.terminate() == 0, sink.tail()
    worker.terminate()
    found = store_memories(env.settings, [erased, kept])
    expected = {**ref_after.result(timeout=300), **ref_other.result(timeout=300)}
    cmp = compare(expected, found)
    pv = env.settings.pipeline_version
    before_summaries = [s for s in env.summaries() if set(s.turn_ids) & doomed]  # written, then erased
    before_ids = set(memories_from_summaries(before_summaries, pv))
    left = len(before_ids & set(found))
    print(
        f"R7 turns={len(before) + len(after) + len(other)} erased mid-stream ({len(before_ids)} memories written "
        f"before it): {cmp.row()} left_after_erasure={left}"
    )
    assert before_ids, "no memory of the user was written before the erasure: nothing was tested"
    assert cmp.exact, cmp.row()
    assert left == 0
    # a replay of the log brings back only what came after the erasure
    out = env.run_cli("replay", "--collection", "replayed")
    assert out.returncode == 0, out.stdout + out.stderr
    assert store_memories(env.settings, [erased, kept], collection="replayed") == found
    replay_letters = DeadLetterLog(env.data_dir / "dead_letters.jsonl").read()
    assert not [d for d in replay_letters if d.key == erased]  # replay's own dead letters: none of theirs


def test_erasure_tombstones_reach_readers_at_once(kafka_env: KafkaEnv) -> None:
    """A purge is visible to every reader of the topic as soon as it returns (latest value per key)."""
    from streams.dlq import dead_letter
    from streams.kafka.erasure import purge_user
    from streams.kafka.topics import dumps, keyed_send

    kafka_env.create_topics()
    k = kafka_env.settings.kafka
    letters = [dead_letter("ingest", "bad", "X", b"payload", user) for user in ("ann", "ann", "bob")]

    async def main() -> tuple[int, int, int]:
        from streams.kafka.produce import make_producer

        producer = make_producer(k, client_id="t")
        await producer.start()
        try:
            for d in letters:
                await (await producer.send(k.topics.dead_letters, value=dumps(d), **keyed_send(d.key, d.dlq_id, 4)))
        finally:
            await producer.stop()
        n = await purge_user(k, "ann")
        return (
            n,
            len(await user_records(k, k.topics.dead_letters, "ann")),
            len(await user_records(k, k.topics.dead_letters, "bob")),
        )

    assert asyncio.run(main()) == (2, 0, 1)


def test_restarted_sink_keeps_the_erasure_epoch(kafka_env: KafkaEnv) -> None:
    """The erasure epoch outlives the sink process: erase a user, restart the sink, then deliver a summary of
    theirs computed before the erasure (in flight meanwhile): nothing of it is written. A summary made after the
    erasure is written (the user came back), and the other user is untouched."""
    env = kafka_env
    env.create_topics()
    k = env.settings.kafka
    by_user = lambda s: s.user_id  # noqa: E731
    old = datetime.now(UTC) - timedelta(minutes=5)
    ann = [summary("ann", n, old) for n in range(3)]
    bob = [summary("bob", n, old) for n in range(2)]
    sink = env.sink("sink-1")
    run_async(produce_records(k, k.topics.summaries, ann + bob, key=by_user))
    env.wait_sink_caught_up()
    erasure = run_async(produce_erasure(env.settings, "ann"))
    run_async(produce_records(k, k.topics.summaries, [erasure], key=by_user))  # the barrier, as the worker forwards it
    env.wait_sink_caught_up()
    assert sink.terminate() == 0, sink.tail()
    pv = env.settings.pipeline_version
    assert store_memories(env.settings, ["ann", "bob"]) == memories_from_summaries(bob, pv), sink.tail()

    in_flight = summary("ann", 10, erasure.requested_at - timedelta(seconds=1))  # computed before the erasure
    came_back = summary("ann", 20, datetime.now(UTC) + timedelta(seconds=1))
    sink = env.sink("sink-2")  # a new process: it knows the erasure only from the broker
    run_async(produce_records(k, k.topics.summaries, [in_flight, came_back], key=by_user))
    env.wait_sink_caught_up()
    assert sink.terminate() == 0, sink.tail()
    assert "older than their user's erasure dropped" in sink.log()
    found = store_memories(env.settings, ["ann", "bob"])
    expected = memories_from_summaries([*bob, came_back], pv)
    cmp = compare(expected, found)
    left = len(set(memories_from_summaries([*ann, in_flight], pv)) & set(found))
    print(f"epoch after a sink restart: {cmp.row()} left_after_erasure={left}")
    assert cmp.exact, cmp.row()
    assert not set(memories_from_summaries([in_flight], pv)) & set(found)
