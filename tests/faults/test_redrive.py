"""R3: the LLM fails (HTTP 500s, invalid JSON, JSON of the wrong shape) for a stretch, then recovers; the failed
batches are dead letters with their reason; ``lightmem dlq redrive --kafka`` reprocesses them, and the final memory
set equals a run without the outage. Also the embedded side: ``ingest --on-error dlq`` and ``dlq list``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_kafka import (
    KafkaEnv,
    LLMProcess,
    embedded_in_background,
    run_async,
    store_memories,
)
from tests.faults.common import compare, corpus, users_on_distinct_partitions

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(600)]

# 4 attempts per batch (max_retries=3); concurrent batches share the queue, so the stretch is long enough for
# several batches to exhaust their attempts whatever the interleaving
OUTAGE = (["500"] * 4 + ["invalid_json"] * 4 + ["bad_schema"] * 4) * 3


def test_r3_llm_outage_then_redrive(make_kafka_env: Any, locomo_conversations: Any, llm_proc: LLMProcess) -> None:
    from streams.kafka.dlq import letters

    env: KafkaEnv = make_kafka_env()
    users = users_on_distinct_partitions(3, env.settings.kafka.partitions)
    turns = corpus(locomo_conversations, users, 1)
    env.create_topics()
    reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
    worker, sink = env.worker("worker-1"), env.sink()
    env.wait_group_members(1)
    llm_proc.control("/control/faults", {"faults": OUTAGE})
    env.produce(turns)

    def failed_turns() -> set[str]:
        out = set()
        for d in run_async(letters(env.settings, "extract")):
            out |= {t["turn_id"] for s in json.loads(d.payload) for t in s["turns"]}
        return out

    def all_accounted() -> bool:
        done = {t for s in env.summaries() for t in s.turn_ids} | failed_turns()
        return {t.turn_id for t in turns} <= done

    env.wait_for("every turn in a summary or a dead letter", all_accounted, 300)
    failed = run_async(letters(env.settings, "extract"))
    assert failed, "the outage dead-lettered no batch"
    assert all("attempt" in d.reason and d.key in users for d in failed)
    llm_proc.control("/control/reset", {})  # the outage is over (faults no call consumed are dropped)
    out = env.run_cli("dlq", "redrive", "--kafka", "--stage", "extract")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(failed)} redriven" in out.stdout, out.stdout
    env.wait_summaries_cover([t.turn_id for t in turns], timeout_s=120)
    time.sleep(2)
    env.wait_sink_caught_up()
    assert not run_async(letters(env.settings, "extract"))  # redriven letters are tombstoned
    assert sink.terminate() == 0, sink.tail()
    worker.terminate()
    found = store_memories(env.settings, users)
    expected = reference.result(timeout=300)
    cmp = compare(expected, found)
    print(f"R3 turns={len(turns)} outage={len(OUTAGE)} failed calls, {len(failed)} batches redriven: {cmp.row()}")
    assert cmp.exact, cmp.row()
    assert found == expected


def test_ingest_on_error_modes(kafka_env: KafkaEnv, tmp_path: Path) -> None:
    good = {
        "user_id": "ann",
        "session_id": "s1",
        "role": "user",
        "content": "I adopted a cat named Miso.",
        "timestamp": "2024-05-01T09:00:00+00:00",
    }
    path = tmp_path / "turns.jsonl"
    path.write_text("\n".join([json.dumps(good), '{"user_id": "ann", "oops"', json.dumps({**good, "seq": 1})]) + "\n")
    stop = kafka_env.run_cli("ingest", str(path))
    assert stop.returncode == 2 and "invalid JSON" in stop.stderr + stop.stdout
    dlq = kafka_env.run_cli("ingest", str(path), "--on-error", "dlq")
    assert dlq.returncode == 0, dlq.stdout + dlq.stderr
    assert "ingested 2 turns" in dlq.stdout
    listed = kafka_env.run_cli("dlq", "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip().startswith("{")]
    assert len(rows) == 1 and rows[0]["stage"] == "ingest" and "invalid JSON" in rows[0]["reason"]
