"""R1 and R2: no loss and no duplicate across worker crashes, rebalances, re-produced turns and a broker restart.

Each case runs the real broker, two ``lightmem worker`` processes and the ``lightmem sink``, and compares the
memory ids in the store with a clean embedded run of the same input produced once.

- R1: several users; the whole input produced, then produced a second time (a client re-sending it) while one
  worker is SIGKILLed at three random points of the stream and restarted each time.
- R2: the broker is stopped and started again mid-stream (``deploy/kafka/kafka.sh down`` / ``up``; the broker
  must be the one that script manages); a process that exits meanwhile is restarted, as a supervisor would.

Sizes: the fast subset (CI) uses a few sessions; ``LIGHTMEM_FAULTS_FULL=1`` runs R1 on about 5,000 turns.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_kafka import ROOT, KafkaEnv, Proc, embedded_in_background, store_memories
from tests.faults.common import compare, corpus, users_on_distinct_partitions

FULL = os.environ.get("LIGHTMEM_FAULTS_FULL") == "1"
pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(3600 if FULL else 900)]


def _covered(env: KafkaEnv) -> int:
    return len({t for s in env.summaries() for t in s.turn_ids})


def _duplicated(env: KafkaEnv) -> int:
    distinct = {s.summary_id: s for s in env.summaries()}
    counts = Counter(t for s in distinct.values() for t in s.turn_ids)
    return sum(1 for c in counts.values() if c > 1)


def _settle(env: KafkaEnv, turn_ids: list[str], procs: dict[str, Proc], timeout_s: float) -> None:
    env.wait_summaries_cover(turn_ids, timeout_s=timeout_s)
    time.sleep(3 * env.settings.stm.idle_timeout_s + 3)  # stragglers (a second flush) would show up by now
    env.wait_sink_caught_up(timeout_s=timeout_s)


def test_r1_sigkill_three_times_with_reproduced_turns(make_kafka_env: Any, locomo_conversations: Any) -> None:
    env: KafkaEnv = make_kafka_env(partitions=4)
    n_users, sessions = (10, 30) if FULL else (4, 1)
    users = users_on_distinct_partitions(n_users, env.settings.kafka.partitions)
    turns = corpus(locomo_conversations, users, sessions)
    env.create_topics()
    reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
    procs = {"w1": env.worker("worker-1"), "w2": env.worker("worker-2"), "sink": env.sink()}
    env.wait_group_members(2)
    rng = random.Random(1309)
    points = sorted(rng.uniform(0.1, 0.8) for _ in range(3))
    env.produce(turns)
    total = len(turns)
    for i, frac in enumerate(points):
        env.wait_for(f"{frac:.0%} of the turns in summaries", lambda f=frac: _covered(env) >= f * total, 600, 0.5)
        procs["w1"].kill()
        if i == 1:
            env.produce(turns)  # every turn a second time (new offsets), while the group rebalances
        procs["w1"] = env.worker(f"worker-1-restart-{i + 1}")
    _settle(env, [t.turn_id for t in turns], procs, 1800 if FULL else 300)
    duplicated = _duplicated(env)
    assert procs["sink"].terminate() == 0, procs["sink"].tail()
    for p in (procs["w1"], procs["w2"]):
        p.terminate()
    found = store_memories(env.settings, users)
    expected = reference.result(timeout=1800)
    cmp = compare(expected, found, duplicated=duplicated)
    print(f"R1 turns={total} (x2 produced) kills=3 at {[round(p, 2) for p in points]}: {cmp.row()}")
    assert cmp.exact, cmp.row()
    assert found == expected


def _kafka_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "deploy" / "kafka" / "kafka.sh"), *args], capture_output=True, text=True, timeout=180
    )


def test_r2_broker_restart_mid_stream(make_kafka_env: Any, locomo_conversations: Any) -> None:
    if _kafka_sh("status").returncode != 0:
        pytest.fail(
            "R2 restarts the broker with deploy/kafka/kafka.sh: export LIGHTMEM_KAFKA_PORT/_DATA of the broker "
            "the tests use (as .ci/run does)",
            pytrace=False,
        )
    env: KafkaEnv = make_kafka_env(partitions=4)
    users = users_on_distinct_partitions(3, env.settings.kafka.partitions)
    turns = corpus(locomo_conversations, users, 1)
    env.create_topics()
    reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
    procs = {"w1": env.worker("worker-1"), "w2": env.worker("worker-2"), "sink": env.sink()}
    env.wait_group_members(2)
    # everything is in the log before the outage: a pause of the input longer than the idle timeout would make
    # the worker flush there (as it should), which a one-pass embedded reference does not do
    env.produce(turns)
    env.wait_for("30% of the turns in summaries", lambda: _covered(env) >= 0.3 * len(turns), 300, 0.5)
    down = _kafka_sh("down")
    assert down.returncode == 0, down.stderr
    time.sleep(5)
    up = _kafka_sh("up")
    assert up.returncode == 0, up.stderr
    restarts = 0
    for name, p in list(procs.items()):
        if not p.alive():  # a supervisor restarts a process that gave up while the broker was away
            restarts += 1
            procs[name] = env.sink(f"sink-{restarts}") if name == "sink" else env.worker(f"{name}-{restarts}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for name, p in list(procs.items()):
            if not p.alive():
                restarts += 1
                procs[name] = env.sink(f"sink-{restarts}") if name == "sink" else env.worker(f"{name}-{restarts}")
        if _covered(env) >= len(turns):
            break
        time.sleep(2)
    _settle(env, [t.turn_id for t in turns], procs, 300)
    duplicated = _duplicated(env)
    assert procs["sink"].terminate() == 0, procs["sink"].tail()
    for name in ("w1", "w2"):
        procs[name].terminate()
    found = store_memories(env.settings, users)
    cmp = compare(reference.result(timeout=600), found, duplicated=duplicated)
    print(f"R2 turns={len(turns)} broker restart, process restarts={restarts}: {cmp.row()}")
    assert cmp.exact, cmp.row()
    Path(env.data_dir / "r2.txt").write_text(cmp.row())
