"""Turns delivered twice (a producer retry, a client re-sending a conversation) never yield a second memory
and never cost one: the memory-id set in the store equals a clean embedded run of the input produced once.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from tests.conftest_kafka import KafkaEnv, LLMProcess, embedded_in_background, store_memories
from tests.faults.common import compare, corpus, users_on_distinct_partitions

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(600)]


def _turn_counts(env: KafkaEnv) -> Counter[str]:
    distinct = {s.summary_id: s for s in env.summaries()}
    return Counter(t for s in distinct.values() for t in s.turn_ids)


@pytest.mark.parametrize("kill", [False, True], ids=["no-kill", "sigkill"])
def test_turns_produced_twice(make_kafka_env: Any, locomo_conversations: Any, llm_proc: LLMProcess, kill: bool) -> None:
    env: KafkaEnv = make_kafka_env()
    users = users_on_distinct_partitions(3, env.settings.kafka.partitions)
    turns = corpus(locomo_conversations, users, 1)
    env.create_topics()
    reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
    if kill:
        llm_proc.control("/control/config", {"latency_s": 0.5})
    worker = env.worker("worker-1")
    sink = env.sink()
    half = len(turns) // 2
    # the first half twice in a row (a producer retry), then the rest, then everything again (a client re-sending);
    # all of it is in the log before the kill: a pause of the input longer than the idle timeout would make the
    # worker flush there (as it should), which the one-pass embedded reference does not do
    env.produce([t for t in turns[:half] for _ in (0, 1)])
    env.produce(turns[half:])
    env.produce(turns)
    if kill:
        env.wait_for("a first summary", lambda: len(env.summaries()) >= 1, 180, every_s=0.3)
        worker.kill()
        llm_proc.control("/control/config", {"latency_s": 0.0})
        worker = env.worker("worker-2")
    env.wait_summaries_cover([t.turn_id for t in turns], timeout_s=300)
    time.sleep(3 * env.settings.stm.idle_timeout_s + 3)  # second-pass flushes would show up by now
    env.wait_sink_caught_up()
    counts = _turn_counts(env)
    assert sink.terminate() == 0, sink.tail()
    worker.terminate()
    found = store_memories(env.settings, users)
    expected = reference.result(timeout=300)
    cmp = compare(expected, found, duplicated=sum(1 for c in counts.values() if c > 1))
    assert cmp.exact, cmp.row()
    assert found == expected
