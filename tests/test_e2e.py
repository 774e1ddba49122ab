"""End to end, embedded: a LoCoMo conversation through the real stages and the OpenAI-compatible test server."""

from __future__ import annotations

import json

import pytest

from streams.api import Memory
from streams.extract import participant_names, states_something
from streams.ltm import MissingUserError
from streams.settings import Settings, STMSettings, StoreSettings
from streams.stages import Stages
from tests.fixtures_llm import llm_settings

pytestmark = pytest.mark.slow


def make_settings(tmp_path, server, **llm_overrides) -> Settings:
    return Settings(
        data_dir=tmp_path / "state",
        store=StoreSettings(path=tmp_path / "qdrant"),
        llm=llm_settings(server, **llm_overrides),
        stm=STMSettings(threshold_tokens=512),
    )


@pytest.fixture(scope="module")
def conversation(locomo_conversations):
    conv = next(c for c in locomo_conversations if c.user_id == "conv-30")
    sessions = sorted({t.session_id for t in conv.turns}, key=lambda s: int(s.split("_")[1]))[:6]
    return [t for t in conv.turns if t.session_id in sessions]


def ingest(settings: Settings, turns, stages: Stages | None = None) -> tuple[set[str], Memory]:
    m = Memory(settings, stages=stages)
    for i in range(0, len(turns), 50):
        m.add_turns(turns[i : i + 50])
    m.flush()
    return {r.memory_id for r in m.get_all(turns[0].user_id)}, m


def test_locomo_conversation_end_to_end(tmp_path, llm, conversation, locomo_conversations):
    settings = make_settings(tmp_path, llm)
    ids_first, m = ingest(settings, conversation)
    user = conversation[0].user_id
    by_id = {t.turn_id: t for t in conversation}
    try:
        records = m.get_all(user)
        facts = [r for r in records if r.kind == "fact"]
        summaries = [r for r in records if r.kind == "summary"]
        assert facts and summaries
        # ONE call per STM flush, and every flush produced a summary
        assert m.costs()["extraction"].calls == len(llm.requests) == len(summaries)
        assert m.costs()["extraction"].input_tokens > 0 and m.costs()["extraction"].output_tokens > 0
        # provenance: every memory names real turns of this conversation, with their event times
        for r in records:
            assert r.user_id == user and set(r.source_turn_ids) <= set(by_id)
            assert r.pipeline_version == settings.pipeline_version
        for f in facts:
            src = by_id[f.source_turn_ids[0]]
            assert src.speaker and f.text.startswith(src.speaker)
            assert f.event_timestamps == sorted(by_id[t].timestamp for t in f.source_turn_ids)
        # no loss: every turn that states something is the source of some fact (small talk, such as "Bye
        # Gina!", is left out by the product's content test, which the test LLM writes its facts by)
        covered = {t for f in facts for t in f.source_turn_ids}
        names = participant_names({t.speaker or t.role for t in conversation})
        stating = {t.turn_id for t in conversation if states_something(t.content, names)}
        assert stating and stating <= covered
        assert len(stating) > 0.9 * len(conversation)
        # search finds the memory of a specific turn, scoped to the user
        probe = next(t for t in conversation if len(t.content.split()) > 12)
        hits = m.search(probe.content, user_id=user, limit=5)
        assert any(probe.turn_id in h.record.source_turn_ids for h in hits)
        with pytest.raises(MissingUserError):
            m.search(probe.content, user_id="")
        stages = m.pipeline.stages
    finally:
        m.close()

    # idempotent re-ingest: a fresh runner over the same store and input leaves the same point ids
    ids_again, m2 = ingest(settings, conversation, stages=stages)
    try:
        assert ids_again == ids_first
        assert m2.pipeline.store.count(user) == len(ids_first)

        # user isolation: another user's memories never show up in this user's reads
        other = next(c for c in locomo_conversations if c.user_id == "conv-26").turns[:40]
        m2.add_turns(other)
        m2.flush()
        other_ids = {r.memory_id for r in m2.get_all("conv-26")}
        assert other_ids and not (other_ids & ids_first)
        for hit in m2.search(other[5].content, user_id=user, limit=20):
            assert hit.record.user_id == user
        assert {r.memory_id for r in m2.get_all(user)} == ids_first
        assert m2.delete_user("conv-26") == len(other_ids)
        assert m2.get_all("conv-26") == [] and len(m2.get_all(user)) == len(ids_first)
    finally:
        m2.close()


def test_faults_end_in_retries_or_dead_letters_never_loss(tmp_path, llm, conversation):
    turns = conversation[:60]
    settings = make_settings(tmp_path, llm, max_retries=6)
    # transient faults (6 < 7 attempts, however they spread over concurrent batches): retried, then all arrives
    llm.inject("500", "timeout", "invalid_json", "bad_schema", "bad_alias", "429")
    ids_ok, m = ingest(settings, turns)
    try:
        assert ids_ok
        assert m.pipeline.dead_letters.read() == []
        n_summaries = sum(1 for r in m.get_all(turns[0].user_id) if r.kind == "summary")
        assert len(llm.requests) == n_summaries + 6  # each fault cost one extra call
        assert m.costs()["extraction"].calls == len(llm.requests)
    finally:
        m.close()

    # persistent outage: after the last retry each batch becomes a dead letter; nothing is silently dropped
    llm.reset()
    settings2 = make_settings(tmp_path / "second", llm, max_retries=2)
    llm.inject(*["500"] * 200)
    m2 = Memory(settings2)
    try:
        m2.add_turns(turns)
        m2.flush()
        dead = m2.pipeline.dead_letters.read()
        assert dead and all(d.stage == "extract" and d.attempts == 3 for d in dead)
        assert all("500" in d.reason for d in dead)
        assert len(llm.requests) == 3 * len(dead)
        lost_turns = [t["turn_id"] for d in dead for seg in json.loads(d.payload) for t in seg["turns"]]
        assert sorted(lost_turns) == sorted(t.turn_id for t in turns)  # every turn is in exactly one dead letter
        assert m2.get_all(turns[0].user_id) == []
    finally:
        m2.close()
