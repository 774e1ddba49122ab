"""Sleep-time update: incremental candidates, decisions through the OpenAI-compatible test server, change
records, re-embedding, history/revert, erasure, crash-and-resume, the offline rule.

Fast layer: prompt/response parsing, change building and applying over a small fake store-free setup.
Slow layer (``slow``): the real MiniLM encoder and the embedded Qdrant engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas.records import MemoryChange, MemoryRecord
from streams import ids
from streams.settings import Settings, SleepSettings, StoreSettings
from streams.sleep import ChangeLog, Compactor, RevertError, Watermarks, apply_changes, build_revert
from streams.sleep.compact import build_changes, overlay_changes, reconcile, select_targets
from streams.sleep.decide import (
    Candidate,
    Decider,
    Decision,
    InvalidDecision,
    neighbourhoods,
    offline_decisions,
    parse_batch,
    plan_batches,
    prompt_tokens,
)
from streams.sleep.prompts import COMPACTION_PROMPT_VERSION, PromptTarget, build_compaction_prompt
from tests.fixtures_llm import llm_settings
from tests.llm_server import (
    LLMServer,
    compaction_answer,
    is_compaction_prompt,
    near_duplicate,
    parse_compaction_prompt,
)

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def mem(user: str, text: str, n: int, day: float, kind: str = "fact", session: str = "s1") -> MemoryRecord:
    """A memory from turn ``n`` of ``session``, created (and said) ``day`` days after T0."""
    turn = ids.turn_id(user, session, n)
    ts = T0 + timedelta(days=day)
    return MemoryRecord(
        memory_id=ids.memory_id(user, [turn], 0, kind),
        user_id=user,
        session_ids=[session],
        text=text,
        kind=kind,  # type: ignore[arg-type]
        source_turn_ids=[turn],
        event_timestamps=[ts],
        topic_id="topic",
        summary_id="summary",
        pipeline_version="test",
        created_at=ts,
        updated_at=ts,
    )


# -- the compaction responder of the test LLM server --------------------------------------------------------

Policy = Callable[[tuple[int, str, str], list[tuple[int, str, str]]], list[dict[str, Any]]]


class CompactionLLM:
    """One responder registered once on the session's server; each test sets ``policy``."""

    def __init__(self, server: LLMServer) -> None:
        self.server = server
        self.policy: Policy = lambda new, older: [{"id": a, "action": "ignore"} for a, _, _ in older]
        server.register(self._answer)

    def _answer(self, messages: list[dict[str, Any]]) -> str | None:
        if not is_compaction_prompt(messages):
            return None
        decisions = [
            {"new": new[0], "old": d["id"], **{k: v for k, v in d.items() if k != "id"}}
            for new, older in parse_compaction_prompt(messages)
            for d in self.policy(new, older)
        ]
        return json.dumps({"decisions": decisions})

    def prompts(self) -> list[tuple[tuple[int, str, str], list[tuple[int, str, str]]]]:
        """Every new memory shown to the LLM with what it was compared with (all calls, in order)."""
        return [
            target
            for r in self.server.requests
            if is_compaction_prompt(r["messages"])
            for target in parse_compaction_prompt(r["messages"])
        ]


@pytest.fixture
def compaction_llm(llm: LLMServer) -> Iterator[CompactionLLM]:
    responder = getattr(llm, "_sleep_responder", None)
    if responder is None:
        responder = CompactionLLM(llm)
        llm._sleep_responder = responder  # type: ignore[attr-defined]
    responder.policy = lambda new, older: [{"id": a, "action": "ignore"} for a, _, _ in older]
    yield responder


def settings_for(tmp_path: Path, server: LLMServer | None = None, **sleep: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "state",
        "store": StoreSettings(path=tmp_path / "qdrant"),
        "sleep": SleepSettings(**sleep),
    }
    if server is not None:
        values["llm"] = llm_settings(server)
    return Settings(**values)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# == fast layer: prompts, parsing, change records, apply/revert over an in-memory store ======================


def test_prompt_shows_integer_aliases_and_parses_back() -> None:
    a_old, b_old = mem("u", "Alice lives in\nParis.", 1, 1), mem("u", "Alice likes Paris.", 0, 0)
    first = mem("u", "Alice moved to Berlin.", 2, 5)
    second = mem("u", "Alice loves Berlin.", 3, 6)
    prompt = build_compaction_prompt(
        [PromptTarget(first, (a_old, b_old)), PromptTarget(second, (first, b_old))]  # b_old shared, first both
    )
    text = prompt.messages[-1]["content"]
    assert all(r.memory_id not in text for r in (a_old, b_old, first, second))
    assert text.count("Alice likes Paris.") == 1 and text.count("Alice moved to Berlin.") == 1  # each shown once
    assert is_compaction_prompt(prompt.messages)
    parsed = parse_compaction_prompt(prompt.messages)
    assert [(n[0], n[2]) for n, _ in parsed] == [(1, "Alice moved to Berlin."), (2, "Alice loves Berlin.")]
    assert parsed[0][0][1] == "2024-03-06 09:00"
    assert [(x[0], x[2]) for x in parsed[0][1]] == [(3, "Alice lives in Paris."), (4, "Alice likes Paris.")]
    assert [(x[0], x[2]) for x in parsed[1][1]] == [(1, "Alice moved to Berlin."), (4, "Alice likes Paris.")]
    assert prompt.aliases == {1: first, 2: second, 3: a_old, 4: b_old}
    assert prompt.compare == {1: (3, 4), 2: (1, 4)} and set(prompt.targets) == {1, 2}
    assert COMPACTION_PROMPT_VERSION == "compact/v2"


def test_parse_batch_validates_per_target() -> None:
    a, b, c = mem("u", "one", 0, 0), mem("u", "two", 1, 1), mem("u", "three", 2, 2)
    t1, t2 = mem("u", "new one", 3, 3), mem("u", "new two", 4, 4)
    prompt = build_compaction_prompt([PromptTarget(t1, (a, b)), PromptTarget(t2, (c,))])  # t1=1, t2=2, a,b,c=3,4,5
    out = parse_batch(
        '```json\n{"decisions": [{"new": 1, "old": 4, "action": "delete", "reason": "dup"}]}\n```', prompt
    )
    assert out == {
        1: [
            Decision(a.memory_id, "ignore", None, "left as it is by the LLM"),
            Decision(b.memory_id, "delete", None, "dup"),
        ],
        2: [Decision(c.memory_id, "ignore", None, "left as it is by the LLM")],
    }
    # one target's bad decision does not spoil the other's
    for bad, kind in [
        ('{"new": 1, "old": 5, "action": "delete"}', "InvalidAlias"),  # 5 is not compared with 1
        ('{"new": 1, "old": 3, "action": "delete"}, {"new": 1, "old": 3, "action": "ignore"}', "InvalidAlias"),
        ('{"new": 1, "old": 3, "action": "update"}', "SchemaViolation"),
        ('{"new": 1, "old": 3, "action": "merge"}', "SchemaViolation"),
    ]:
        out = parse_batch('{"decisions": [' + bad + ', {"new": 2, "old": 5, "action": "delete"}]}', prompt)
        assert isinstance(out[1], InvalidDecision) and out[1].error_type == kind, bad
        assert out[2] == [Decision(c.memory_id, "delete", None, "")]
    # the answer as a whole unusable: raised (the client asks again)
    for bad, kind in [
        ('{"decisions": [{"new": 7, "old": 3, "action": "delete"}]}', "InvalidAlias"),
        ('{"decisions": [{"old": 3, "action": "delete"}]}', "InvalidAlias"),
        ('{"verdicts": []}', "SchemaViolation"),
        (
            '{"decisions": [{"new": 1, "old": 9, "action": "delete"}, {"new": 2, "old": 9, "action": "delete"}]}',
            "InvalidAlias",
        ),
        ("not json", "InvalidJSON"),
        ("", "EmptyResponse"),
    ]:
        with pytest.raises(InvalidDecision) as exc:
            parse_batch(bad, prompt)
        assert exc.value.error_type == kind, bad


def test_batches_follow_neighbourhoods_within_the_budget() -> None:
    old = [
        mem("u", f"Alice fact number {i} about her many hobbies and places she has visited.", i, i) for i in range(40)
    ]
    new = [mem("u", f"Alice new fact {i}.", 100 + i, 50 + i) for i in range(20)]
    # targets 0..9 share candidates pairwise (a chain), targets 10..19 are each alone
    targets = [PromptTarget(new[i], (old[i], old[i + 1])) for i in range(10)]
    targets += [PromptTarget(new[i], (old[i + 15],)) for i in range(10, 20)]
    groups = neighbourhoods(targets)
    assert groups[0] == list(range(10)) and all(len(g) == 1 for g in groups[1:]) and len(groups) == 11
    big = plan_batches(targets, 100_000)
    assert len(big) == 1 and len(big[0]) == 20
    prompt = build_compaction_prompt(big[0])
    assert len(prompt.aliases) == 20 + 11 + 10  # shared candidates shown once
    budget = prompt_tokens(targets[:10]) + 60  # the chain fits, not much more (the estimate is a bit cautious)
    small = plan_batches(targets, budget)
    assert small[0][:10] == targets[:10]  # a neighbourhood stays together
    assert [t for b in small for t in b] == targets and len(small) > 1
    assert all(prompt_tokens(b) <= budget for b in small)
    tiny = plan_batches(targets, 300)  # below one neighbourhood: split, each target still decided
    assert [t for b in tiny for t in b] == targets and all(b for b in tiny)


def test_decider_batches_exact_rule_first_and_retries_a_bad_target_alone() -> None:
    """Through the test server's own rule (near-duplicates deleted): one call for three targets, the identical
    text decided without a call, a target with an invalid answer retried alone, then dead-lettered."""
    cat_old = mem("u", "Ann has a cat named Miso who is three years old.", 0, 0)
    job_old = mem("u", "Ann works as a nurse in Lyon.", 1, 1)
    tea_old = mem("u", "Ann drinks green tea every morning.", 2, 2)
    cat_new = mem("u", "Ann has a cat named Miso who is three years old now.", 3, 5)  # near-duplicate
    job_new = mem("u", "Ann now works as a teacher in Paris.", 4, 6)
    tea_new = mem("u", "ann drinks green tea every morning!", 5, 7)  # identical once normalised
    plans = [
        (cat_new, [Candidate(cat_old, 0.95), Candidate(job_old, 0.81)]),
        (job_new, [Candidate(job_old, 0.86)]),
        (tea_new, [Candidate(tea_old, 0.99)]),
    ]
    now = T0 + timedelta(days=9)

    async def decide(server: LLMServer) -> Any:
        decider = Decider(llm_settings(server), SleepSettings(), "pv")
        try:
            return await decider.decide(plans, now)
        finally:
            await decider.aclose()

    with LLMServer() as server:
        result = run(decide(server))
        assert result.cost.calls == 1 and result.batches == 1 and result.dead_letters == []
        (body,) = server.requests
        ((new1, older1), (new2, older2)) = parse_compaction_prompt(body["messages"])  # the tea pair needed no call
        assert (new1[2], new2[2]) == (cat_new.text, job_new.text) and older2[0] == older1[1]  # job_old shown once
        got = {t: [(d.memory_id, d.action, d.model) for d in ds] for t, ds in result.decisions.items()}
        assert got == {
            cat_new.memory_id: [(cat_old.memory_id, "delete", None), (job_old.memory_id, "ignore", None)],
            job_new.memory_id: [(job_old.memory_id, "ignore", None)],
            tea_new.memory_id: [(tea_old.memory_id, "delete", "exact-rule")],
        }
        assert compaction_answer(body["messages"]) == {
            "decisions": [{"new": 1, "old": 3, "action": "delete", "reason": "near-duplicate"}]
        }

        server.reset()
        server.inject("bad_alias")  # the first target's answer is invalid; the second's stands
        result = run(decide(server))
        assert result.cost.calls == 2 and result.batches == 2 and result.dead_letters == []
        assert [len(parse_compaction_prompt(r["messages"])) for r in server.requests] == [2, 1]  # retried alone
        assert [d.action for d in result.decisions[cat_new.memory_id]] == ["delete", "ignore"]

        server.reset()
        server.inject("bad_alias", *["bad_alias"] * 4)  # ... and its retries alone fail too (1 + 3 retries)
        result = run(decide(server))
        assert result.cost.calls == 1 + 4
        (dead,) = result.dead_letters
        assert dead.stage == "compact" and dead.attempts == 4 and dead.error_type == "InvalidAlias"
        assert json.loads(dead.payload)["target"]["memory_id"] == cat_new.memory_id
        assert cat_new.memory_id not in result.decisions or result.decisions[cat_new.memory_id] == []
        assert [d.action for d in result.decisions[job_new.memory_id]] == ["ignore"]  # the rest of the batch stands
        assert [d.action for d in result.decisions[tea_new.memory_id]] == ["delete"]


def test_offline_rule() -> None:
    new = mem("u", "Alice has a cat named Miso!", 3, 3)
    same = mem("u", "alice has a  cat named miso", 0, 0)
    near = mem("u", "Alice has a cat called Miso", 1, 1)
    other = mem("u", "Alice has a dog", 2, 2)
    cands = [Candidate(same, 0.90), Candidate(near, 0.96), Candidate(other, 0.85)]
    got = {d.memory_id: d.action for d in offline_decisions(new, cands, 0.95)}
    assert got == {same.memory_id: "delete", near.memory_id: "delete", other.memory_id: "ignore"}


def test_test_server_rule_compares_what_its_facts_say() -> None:
    """The test LLM's near-duplicate rule: its own facts ("<speaker> (on <date>): <text>") only of the same
    speaker, compared without the speaker and date; other texts as they are."""
    assert near_duplicate(
        "Nate (on 2022-11-07): I adopted a turtle named Tim", "Nate (on 2022-03-01): adopted turtle named Tim!"
    )
    assert not near_duplicate("Joanna (on 2022-06-05): Bye Nate!", "Nate (on 2022-11-09): Bye Joanna!")
    assert not near_duplicate(
        "Joanna (on 2022-06-05): I love hiking trails", "Nate (on 2022-06-05): I love hiking trails"
    )
    assert not near_duplicate("Nate (on 2022-06-05): I love hiking trails", "Nate (on 2022-06-05): I love video games")
    assert near_duplicate("Ann has a cat named Miso.", "ann has a cat named miso")


def test_select_targets_is_incremental() -> None:
    old, new = mem("u", "old", 0, 0), mem("u", "new", 1, 2)
    summary = mem("u", "summary", 2, 2, kind="summary")
    rewritten = mem("u", "rewritten", 3, 3).model_copy(update={"version": 2})
    recs = [new, summary, old, rewritten]
    assert select_targets(recs, None, ["fact"]) == [old, new]
    assert select_targets(recs, T0 + timedelta(days=1), ["fact"]) == [new]
    assert select_targets(recs, T0 + timedelta(days=2), ["fact"]) == []
    assert select_targets(recs, T0 + timedelta(days=1), ["fact", "summary"]) == [new, summary]


def test_delete_keeps_provenance_and_record() -> None:
    target = mem("u", "Alice now lives in Berlin.", 5, 5)
    older = mem("u", "Alice lives in Paris.", 1, 1)
    other = mem("u", "Alice visited Berlin once.", 2, 2)
    now = T0 + timedelta(days=9)
    cands = [Candidate(older, 0.9), Candidate(other, 0.85)]
    decisions = [
        Decision(older.memory_id, "delete", reason="moved"),
        Decision(other.memory_id, "update", "Alice visited Berlin once, and now lives there.", "adds"),
    ]
    changes = build_changes(target, cands, decisions, "llm:test", "pv", now)
    assert [c.action for c in changes] == ["update", "update", "delete"]
    # a superseded memory of the same normalised text adds nothing to what the survivor is searched by
    same = mem("u", "alice now lives in berlin", 0, 0)
    (kept, _) = build_changes(target, [Candidate(same, 0.99)], [Decision(same.memory_id, "delete")], "m", "pv", now)
    assert kept.new_record is not None and kept.new_record.index_text is None
    upd, absorb, delete = changes
    assert upd.memory_id == other.memory_id and upd.new_record is not None
    assert set(upd.new_record.source_turn_ids) == set(other.source_turn_ids) | set(target.source_turn_ids)
    assert upd.new_record.version == 2 and upd.new_record.updated_at == now and upd.caused_by == [target.memory_id]
    assert absorb.memory_id == target.memory_id and absorb.new_record is not None
    assert absorb.new_record.text == target.text and absorb.new_record.version == 2
    assert set(absorb.new_record.source_turn_ids) == set(target.source_turn_ids) | set(older.source_turn_ids)
    assert absorb.caused_by == [older.memory_id]
    # the survivor is searched by the superseded memory's words too ("Paris"), each text once
    assert absorb.new_record.index_text == "Alice now lives in Berlin.\nAlice lives in Paris."
    # the rewritten memory by its new text first, then what it and the target were found by
    assert upd.new_record.index_text == "\n".join([upd.new_record.text, other.text, target.text])
    assert delete.old_record == older and delete.caused_by == [target.memory_id]
    # deterministic ids: the same decisions give the same change ids
    again = build_changes(target, cands, decisions, "llm:test", "pv", now + timedelta(hours=1))
    assert [c.change_id for c in again] == [c.change_id for c in changes]
    assert len({c.change_id for c in changes}) == 3


def test_decisions_made_together_are_reconciled_in_target_order() -> None:
    """Two targets decided in one batch both act on the same older memories: the first decision stands, the
    later one is recorded as an ignore; a memory that only gained provenance is taken in its current state."""
    x, y = mem("u", "Ann lives in Paris.", 0, 0), mem("u", "Ann has a dog.", 1, 1)
    a, b = mem("u", "Ann moved to Berlin.", 2, 2), mem("u", "Ann lives in Berlin with a dog.", 3, 3)
    now = T0 + timedelta(days=9)
    overlay: dict[str, MemoryRecord | None] = {}
    first = [Decision(x.memory_id, "delete", reason="moved"), Decision(y.memory_id, "update", "Ann has a dog, Rex.")]
    cands_a = [Candidate(x, 0.9), Candidate(y, 0.85)]
    c_a, d_a = reconcile(cands_a, first, overlay)
    changes_a = build_changes(a, c_a, d_a, "m", "pv", now)
    overlay_changes(overlay, changes_a)
    later = [
        Decision(x.memory_id, "delete", reason="dup"),
        Decision(y.memory_id, "update", "Ann has a dog and lives in Berlin."),
        Decision(a.memory_id, "delete", reason="superseded"),
    ]
    c_b, d_b = reconcile([Candidate(x, 0.9), Candidate(y, 0.8), Candidate(a, 0.9)], later, overlay)
    assert [(d.memory_id, d.action) for d in d_b] == [
        (x.memory_id, "ignore"),  # already deleted by the first target
        (y.memory_id, "ignore"),  # already rewritten
        (a.memory_id, "delete"),  # only gained provenance (absorbed x): deleted in its current state
    ]
    assert "already deleted" in d_b[0].reason and "already rewritten" in d_b[1].reason
    assert c_b[2].record.version == 2 and set(c_b[2].record.source_turn_ids) == {*a.source_turn_ids, *x.source_turn_ids}
    changes_b = build_changes(b, c_b, d_b, "m", "pv", now)
    (absorb,) = [c for c in changes_b if c.memory_id == b.memory_id]
    assert absorb.new_record is not None  # b keeps the evidence of a and, through a, of x
    assert set(absorb.new_record.source_turn_ids) == {*a.source_turn_ids, *b.source_turn_ids, *x.source_turn_ids}
    assert len({c.change_id for c in changes_a + changes_b}) == len(changes_a) + len(changes_b)


def test_changelog_dedups_and_forgets(tmp_path: Path) -> None:
    target, older = mem("u", "b", 1, 1), mem("u", "a", 0, 0)
    other = mem("v", "x", 0, 0)
    now = T0 + timedelta(days=3)
    ch = build_changes(target, [Candidate(older, 0.9)], [Decision(older.memory_id, "ignore")], "m", "pv", now)
    ch_v = build_changes(other, [Candidate(other, 0.9)], [Decision(other.memory_id, "ignore")], "m", "pv", now)
    log = ChangeLog.in_dir(tmp_path)
    assert len(log.append(ch + ch)) == 1 and log.append(ch) == []
    log.append(ch_v)
    with log.path.open("a") as f:
        f.write('{"schema_version": 1, "change_id": "torn')  # a crash while appending
    log = ChangeLog.in_dir(tmp_path)
    assert len(log) == 2 and log.for_memory(older.memory_id) == ch
    assert log.forget_user("u") == 1
    assert [c.user_id for c in ChangeLog.in_dir(tmp_path).all()] == ["v"]
    marks = Watermarks.in_dir(tmp_path)
    marks.set("u", now, now)
    assert Watermarks.in_dir(tmp_path).get("u") == now and marks.forget("u")
    assert Watermarks.in_dir(tmp_path).get("u") is None


# == slow layer: the real encoder and the embedded engine ==================================================


@pytest.fixture
def world(tmp_path: Path, encoder):  # noqa: ANN001, ANN201
    """(make_settings, store factory) sharing one tmp store path; stores are closed at the end."""
    from streams.ltm import open_store

    opened = []

    def store_for(settings: Settings):  # noqa: ANN202
        s = open_store(settings.store, encoder.dim)
        opened.append(s)
        return s

    yield store_for
    for s in opened:
        try:
            s.close()
        except Exception:  # noqa: BLE001 - closed by the test already
            pass


def put(store: Any, encoder: Any, records: list[MemoryRecord]) -> None:
    store.upsert(records, encoder.embed([r.text for r in records]))


def compact_now(settings: Settings, store: Any, encoder: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        c = Compactor(settings, store, encoder.embed)
        try:
            return await c.run(**kwargs)
        finally:
            await c.aclose()

    return run(go())


ALICE = [
    ("Alice lives in Paris with her partner.", 0),
    ("Alice has a cat named Miso.", 1),
    ("Alice works as a nurse at a hospital.", 2),
]


@pytest.mark.slow
def test_incremental_second_run_makes_no_llm_call(tmp_path, world, encoder, compaction_llm) -> None:  # noqa: ANN001
    settings = settings_for(tmp_path, compaction_llm.server)
    store = world(settings)
    put(store, encoder, [mem("alice", t, i, d) for i, (t, d) in enumerate(ALICE)])
    put(store, encoder, [mem("alice", "Alice has a cat called Miso.", 10, 5)])  # near the cat fact
    report = compact_now(settings, store, encoder)
    prompts = compaction_llm.prompts()
    # first run: every memory is new, but only the one with a close EARLIER neighbour costs a call
    assert report.targets == 4 and len(prompts) == 1 and report.cost.calls == 1
    new, older = prompts[0]
    assert new[2] == "Alice has a cat called Miso." and [t for _, _, t in older] == ["Alice has a cat named Miso."]
    assert report.cost.input_tokens > 0 and report.cost.output_tokens > 0 and report.cost.stage == "compaction"
    assert report.actions == {"ignore": 1}

    compaction_llm.server.reset()
    report = compact_now(settings, store, encoder)
    assert report.targets == 0 and compaction_llm.server.requests == [] and report.cost.calls == 0

    # one new memory → one call, about that memory only, against earlier memories only
    put(store, encoder, [mem("alice", "Alice works as a nurse in a children's hospital.", 11, 7)])
    report = compact_now(settings, store, encoder)
    prompts = compaction_llm.prompts()
    assert report.targets == 1 and len(prompts) == 1
    assert prompts[0][0][2] == "Alice works as a nurse in a children's hospital."
    assert "Alice works as a nurse at a hospital." in [t for _, _, t in prompts[0][1]]


@pytest.mark.slow
def test_update_reembeds_and_bumps_version(tmp_path, world, encoder, compaction_llm) -> None:  # noqa: ANN001
    settings = settings_for(tmp_path, compaction_llm.server, similarity_threshold=0.6)
    store = world(settings)
    old = mem("alice", "Alice works as a nurse at a hospital.", 0, 0)
    new = mem("alice", "Alice works as a nurse at the hospital in Lyon.", 1, 3)
    put(store, encoder, [old, new])
    rewritten = "Alice is a pediatric nurse in Lyon since spring 2024."
    compaction_llm.policy = lambda n, older: [
        {"id": a, "action": "update", "text": rewritten, "reason": "place"} for a, _, _ in older
    ]
    report = compact_now(settings, store, encoder)
    assert report.actions == {"update": 1}
    (got,) = store.get("alice", [old.memory_id])
    assert got.text == rewritten and got.version == 2 and got.updated_at > got.created_at
    assert set(got.source_turn_ids) == set(old.source_turn_ids) | set(new.source_turn_ids)
    # re-embedded: a dense search by the new wording finds it first, with the vector of the new text
    hits = store.search("alice", rewritten, encoder.embed_one(rewritten), 1, mode="dense")
    assert hits[0].record.memory_id == old.memory_id and hits[0].score > 0.99
    # a BM25 search by a word only in the new text finds it too
    assert store.search("alice", "pediatric", None, 1, mode="sparse")[0].record.memory_id == old.memory_id
    change = ChangeLog.in_dir(settings.data_dir).for_memory(old.memory_id)[0]
    assert (change.old_text, change.new_text, change.old_version, change.new_version) == (old.text, rewritten, 1, 2)
    assert change.model == "llm:test-model/compact/v2" and change.caused_by == [new.memory_id]


@pytest.mark.slow
def test_delete_then_revert_restores_the_point(tmp_path, world, encoder, compaction_llm) -> None:  # noqa: ANN001
    settings = settings_for(tmp_path, compaction_llm.server, similarity_threshold=0.6)
    store = world(settings)
    old = mem("alice", "Alice lives in Paris with her partner.", 0, 0)
    new = mem("alice", "Alice lives in Berlin with her partner now.", 1, 4)
    put(store, encoder, [old, new])
    compaction_llm.policy = lambda n, older: [{"id": a, "action": "delete", "reason": "moved"} for a, _, _ in older]
    compact_now(settings, store, encoder)
    assert store.get("alice", [old.memory_id]) == []
    (survivor,) = store.get("alice", [new.memory_id])
    assert set(survivor.source_turn_ids) == set(old.source_turn_ids) | set(new.source_turn_ids)  # evidence kept
    log = ChangeLog.in_dir(settings.data_dir)
    (delete,) = [c for c in log.for_memory(old.memory_id) if c.action == "delete"]
    assert delete.old_record == old

    rc = build_revert(delete, None, datetime.now(UTC), settings.pipeline_version)
    log.append([rc])
    apply_changes([rc], store, encoder.embed)
    (back,) = store.get("alice", [old.memory_id])
    assert back.text == old.text and back.memory_id == old.memory_id and back.version == 2
    hits = store.search("alice", "Paris", encoder.embed_one("Where does Alice live in Paris?"), 1, mode="dense")
    assert hits[0].record.memory_id == old.memory_id
    # applying again, or the delete again, changes nothing: versions guard every change
    again = apply_changes([delete, rc], store, encoder.embed)
    assert again.applied == 0 and store.get("alice", [old.memory_id])[0].version == 2
    with pytest.raises(RevertError):
        build_revert(delete, back, datetime.now(UTC), settings.pipeline_version)  # it exists again
    # a restored memory is not new: the next run makes no call
    compaction_llm.server.reset()
    assert compact_now(settings, store, encoder).targets == 0 and compaction_llm.server.requests == []


@pytest.mark.slow
def test_history_and_revert_commands(tmp_path, world, encoder, compaction_llm, monkeypatch) -> None:  # noqa: ANN001
    from streams.cli import app

    settings = settings_for(tmp_path, compaction_llm.server)
    for key, value in {
        "LIGHTMEM_DATA_DIR": str(settings.data_dir),
        "LIGHTMEM_STORE__PATH": str(settings.store.path),
        "LIGHTMEM_LLM__BASE_URL": compaction_llm.server.url,
        "LIGHTMEM_LLM__MODEL": "test-model",
        "LIGHTMEM_LLM__BACKOFF_S": "0.01",
    }.items():
        monkeypatch.setenv(key, value)
    store = world(settings)
    old = mem("alice", "Alice works as a nurse at a hospital.", 0, 0)
    new = mem("alice", "Alice works as a nurse at the hospital in Lyon.", 1, 3)
    put(store, encoder, [old, new])
    store.close()  # one owner at a time: the CLI opens it
    compaction_llm.policy = lambda n, older: [
        {"id": a, "action": "update", "text": "Alice is a nurse in Lyon.", "reason": "place"} for a, _, _ in older
    ]
    cli = CliRunner()
    res = cli.invoke(app, ["compact", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["users"][0]["actions"] == {"update": 1} and out["cost"]["calls"] == 1
    (change,) = ChangeLog.in_dir(settings.data_dir).for_memory(old.memory_id)

    res = cli.invoke(app, ["memory", "revert", change.change_id[:13]])
    assert res.exit_code == 0, res.output
    assert "restored" in res.stdout
    res = cli.invoke(app, ["memory", "history", old.memory_id, "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    current, life = lines[0]["current"], lines[1:]
    assert current["text"] == old.text and current["version"] == 3
    assert [c["action"] for c in life] == ["update", "revert"]
    assert life[0]["new_text"] == "Alice is a nurse in Lyon." and life[1]["reverts"] == change.change_id
    res = cli.invoke(app, ["memory", "history", old.memory_id])
    assert res.exit_code == 0 and "revert" in res.stdout and "update" in res.stdout
    res = cli.invoke(app, ["memory", "revert", change.change_id])
    assert res.exit_code == 0 and "already reverted" in res.stdout
    res = cli.invoke(app, ["memory", "history", "no-such-memory"])
    assert res.exit_code == 1


@pytest.mark.slow
def test_crash_mid_run_resumes_without_redoing_a_finished_user(tmp_path, world, encoder, compaction_llm) -> None:  # noqa: ANN001
    settings = settings_for(tmp_path, compaction_llm.server)
    store = world(settings)
    users = ["alice", "bob", "carol"]
    for u in users:
        name = u.capitalize()
        put(
            store,
            encoder,
            [
                mem(u, f"{name} has a cat named Miso.", 0, 0),
                mem(u, f"{name} has a cat called Miso.", 1, 2),
                mem(u, f"{name} plays the violin every evening.", 2, 3),
                mem(u, f"{name} plays violin in the evenings.", 3, 4),
            ],
        )
    compaction_llm.policy = lambda n, older: [{"id": a, "action": "delete", "reason": "dup"} for a, _, _ in older]
    finished: list[str] = []

    def crash(run_: Any) -> None:
        finished.append(run_.user_id)
        raise RuntimeError("injected crash after the first user")

    with pytest.raises(RuntimeError, match="injected crash"):
        compact_now(settings, store, encoder, after_user=crash)
    done = finished[0]  # (another user may have finished in the same instant; it raised too)
    marks = Watermarks.in_dir(settings.data_dir)
    assert all(marks.get(u) is not None for u in finished)
    assert len(store.get_all(done)) == 2  # its two duplicates are gone

    compaction_llm.server.reset()
    report = compact_now(settings, store, encoder)
    asked = {t for new, older in compaction_llm.prompts() for t in [new[2], *(o[2] for o in older)]}
    for u in finished:  # a finished user is not redone
        assert not any(t.startswith(u.capitalize()) for t in asked)
    assert {u.user_id for u in report.users if u.targets} <= set(users) - set(finished)
    for u in users:
        recs = store.get_all(u)
        assert len(recs) == 2, u
        turns = {t for r in recs for t in r.source_turn_ids}
        assert turns == {ids.turn_id(u, "s1", n) for n in range(4)}  # provenance of the deleted kept
        assert Watermarks.in_dir(settings.data_dir).get(u) is not None
    # nothing was applied twice: one delete per duplicate in the log
    log = ChangeLog.in_dir(settings.data_dir)
    assert sorted(c.action for c in log.all() if c.action == "delete") == ["delete"] * 6


@pytest.mark.slow
def test_changes_logged_but_not_applied_are_applied_on_resume(tmp_path, world, encoder, monkeypatch) -> None:  # noqa: ANN001
    import streams.sleep.compact as compact_mod

    settings = settings_for(tmp_path)  # offline rule
    store = world(settings)
    old, new = mem("dan", "Dan drives a red car.", 0, 0), mem("dan", "Dan drives a red car", 1, 1)
    put(store, encoder, [old, new])

    def die(*a: Any, **k: Any) -> None:
        raise RuntimeError("killed between logging and applying")

    monkeypatch.setattr(compact_mod, "apply_changes", die)
    with pytest.raises(RuntimeError, match="killed"):
        compact_now(settings, store, encoder)
    assert len(store.get_all("dan")) == 2 and len(ChangeLog.in_dir(settings.data_dir)) == 2
    monkeypatch.undo()
    report = compact_now(settings, store, encoder)
    assert report.users[0].recovered == 2
    (kept,) = store.get_all("dan")
    assert kept.memory_id == new.memory_id and set(kept.source_turn_ids) == set(old.source_turn_ids) | set(
        new.source_turn_ids
    )


@pytest.mark.slow
def test_offline_rule_merges_near_duplicates_and_keeps_provenance(tmp_path, world, encoder) -> None:  # noqa: ANN001
    settings = settings_for(tmp_path)
    store = world(settings)
    recs = [
        mem("erin", "Erin's favourite food is sushi.", 0, 0),
        mem("erin", "erin's favourite food is SUSHI", 1, 1, session="s2"),  # same normalised text
        mem("erin", "Erin is training for the Boston marathon.", 2, 2),
        mem("erin", "Erin is training for the marathon in Boston.", 3, 3),  # near-duplicate
        mem("erin", "Erin ran a half marathon last year.", 4, 4),  # related, not a duplicate
        mem("erin", "Erin talked about food and running.", 5, 5, kind="summary"),
    ]
    put(store, encoder, recs)
    evidence = {t for r in recs for t in r.source_turn_ids}
    report = compact_now(settings, store, encoder)
    assert report.cost.calls == 0 and {u.user_id for u in report.users} == {"erin"}
    left = {r.text: r for r in store.get_all("erin")}
    assert set(left) == {
        "erin's favourite food is SUSHI",
        "Erin is training for the marathon in Boston.",
        "Erin ran a half marathon last year.",
        "Erin talked about food and running.",
    }
    assert {t for r in left.values() for t in r.source_turn_ids} == evidence  # evidence recall cannot drop
    sushi = left["erin's favourite food is SUSHI"]
    assert sushi.session_ids == ["s2", "s1"] and sushi.version == 2 and len(sushi.event_timestamps) == 2
    log = ChangeLog.in_dir(settings.data_dir)
    assert {c.model for c in log.all()} == {"offline-rule"}
    assert sum(c.action == "delete" for c in log.all()) == 2
    assert left["Erin talked about food and running."].version == 1  # summaries are not compacted


@pytest.mark.slow
def test_llm_failure_is_a_dead_letter_never_a_silent_ignore(tmp_path, world, encoder, compaction_llm) -> None:  # noqa: ANN001
    from streams.dlq import DeadLetterLog

    settings = settings_for(tmp_path, compaction_llm.server)
    store = world(settings)
    put(store, encoder, [mem("fay", "Fay has a cat named Miso.", 0, 0), mem("fay", "Fay has a cat called Miso.", 1, 1)])
    compaction_llm.server.inject("500", "invalid_json", "429", "bad_schema")  # 4 attempts: all fail
    report = compact_now(settings, store, encoder)
    assert report.cost.calls == 4 and report.changes == []
    (dead,) = DeadLetterLog(settings.data_dir / "dead_letters.jsonl").read()
    assert dead.stage == "compact" and dead.key == "fay" and dead.attempts == 4
    assert json.loads(dead.payload)["target"]["text"] == "Fay has a cat called Miso."
    assert len(store.get_all("fay")) == 2
    # a retried success is not a dead letter
    compaction_llm.server.inject("500")
    report = compact_now(settings, store, encoder, full=True)
    assert report.cost.calls == 2 and report.dead_letters == [] and report.actions == {"ignore": 1}


@pytest.mark.slow
def test_erasure_leaves_nothing(tmp_path, compaction_llm) -> None:  # noqa: ANN001
    from streams.api import Memory
    from streams.cli import app

    settings = settings_for(tmp_path, compaction_llm.server)
    compaction_llm.policy = lambda n, older: [{"id": a, "action": "delete", "reason": "dup"} for a, _, _ in older]
    with Memory(settings) as m:
        for user in ("gus", "hana"):
            m.add("I adopted a cat named Miso last week.", user_id=user, session_id="s1")
            m.flush(user)  # two extraction batches: the second one's memories are newer
            m.add("I adopted a cat named Miso last week!", user_id=user, session_id="s2")
            m.flush(user)
        # an unfinished STM buffer for gus, and a dead letter of his
        m.add("I also play the violin on weekends.", user_id="gus", session_id="s3")
        report = m.compact()
        assert m.costs()["compaction"].calls == report.cost.calls
        assert ChangeLog.in_dir(settings.data_dir).for_user("gus")
    compaction_llm.server.inject("500", "500", "500", "500")
    with Memory(settings) as m:
        m.add("I love violins.", user_id="gus", session_id="s4")
        m.flush("gus")
        assert m.dead_letters()
        m.add("Something buffered.", user_id="gus", session_id="s5")

        r = m.erase("gus")
        assert r.memories > 0 and r.changes > 0 and r.watermark and r.dead_letters == 1
        assert m.pipeline.store.count("gus") == 0 and "gus" not in m.pipeline.sensory and "gus" not in m.pipeline.stm
        assert m.search("cat Miso", user_id="gus") == [] and m.get_all("gus") == []
        assert m.pipeline.store.count("hana") > 0
        assert "gus" not in m.pipeline.store.users()
    data = settings.data_dir
    assert not ChangeLog.in_dir(data).for_user("gus") and ChangeLog.in_dir(data).for_user("hana")
    assert Watermarks.in_dir(data).get("gus") is None and Watermarks.in_dir(data).get("hana") is not None
    for f in data.rglob("*.json*"):  # no state file mentions him any more
        assert '"gus' not in f.read_text(), f
    # the CLI: forget through the command, then nothing is found
    cli = CliRunner()
    env = {"LIGHTMEM_DATA_DIR": str(data), "LIGHTMEM_STORE__PATH": str(settings.store.path)}
    res = cli.invoke(app, ["forget", "--user", "hana", "--yes"], env=env)
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["search", "cat", "--user", "hana", "--json"], env=env)
    assert res.exit_code == 0 and res.stdout.strip() == ""
    res = cli.invoke(app, ["compact", "--user", "hana", "--json"], env=env)
    assert json.loads(res.stdout.strip().splitlines()[-1])["users"][0]["targets"] == 0
    assert not ChangeLog.in_dir(data).all()


def test_revert_refuses_an_ignore_and_a_changed_memory() -> None:
    older, target = mem("u", "a", 0, 0), mem("u", "b", 1, 1)
    now = T0 + timedelta(days=2)
    (ign,) = build_changes(target, [Candidate(older, 0.9)], [Decision(older.memory_id, "ignore")], "m", "pv", now)
    with pytest.raises(RevertError):
        build_revert(ign, older, now, "pv")
    (upd,) = build_changes(target, [Candidate(older, 0.9)], [Decision(older.memory_id, "update", "a2")], "m", "pv", now)
    later = upd.new_record.model_copy(update={"version": 3})  # type: ignore[union-attr]
    with pytest.raises(RevertError):
        build_revert(upd, later, now, "pv")
    forced = build_revert(upd, later, now, "pv", force=True)
    assert forced.new_record is not None and forced.new_record.text == "a" and forced.new_record.version == 4


def test_decider_is_offline_without_base_url() -> None:
    from streams.settings import LLMSettings

    d = Decider(LLMSettings(), SleepSettings(), "pv")
    assert d.offline and d.name == "offline-rule"


# == Kafka: requests, the nightly schedule, and the agent through a real broker ================================


def test_nightly_schedule_and_requests() -> None:
    from streams.sleep.schedule import active_users, compaction_request, cron_format, last_slot

    sleep = SleepSettings(cron_time="03:30", timezone="Europe/Berlin")
    assert cron_format(sleep) == "30 3 * * *"
    before = datetime(2024, 7, 2, 1, 0, tzinfo=UTC)  # 03:00 in Berlin (CEST): before today's 03:30
    after = datetime(2024, 7, 2, 2, 0, tzinfo=UTC)  # 04:00 in Berlin
    assert last_slot(before, sleep).isoformat() == "2024-07-01T03:30:00+02:00"
    assert last_slot(after, sleep).isoformat() == "2024-07-02T03:30:00+02:00"
    assert last_slot(datetime(2024, 1, 2, 2, 30, tzinfo=UTC), sleep).isoformat() == "2024-01-02T03:30:00+01:00"
    a, b = compaction_request("alice", "nightly:x"), compaction_request("alice", "nightly:x")
    assert a.request_id == b.request_id != compaction_request("alice", "nightly:y").request_id
    assert a.watermark is None and a.user_id == "alice"
    assert active_users({"alice": 10.0, "bob": 5.0, "carol": 11.0}, 9.0) == ["alice", "carol"]


def test_locked_store_serialises_calls() -> None:
    from streams.kafka.compaction import LockedStore

    class Fake:
        dim = 3

        def count(self, user_id: str | None = None) -> int:
            assert locked._lock._is_owned()  # type: ignore[attr-defined]
            return 7

    locked = LockedStore(Fake())  # type: ignore[arg-type]
    assert locked.count("u") == 7 and locked.dim == 3


def _kafka_settings(tmp_path: Path, server: LLMServer) -> Settings:
    import os
    import uuid

    from streams.settings import KafkaSettings, KafkaTopics

    suffix = uuid.uuid4().hex[:8]
    topics = KafkaTopics(**{k: f"test-sleep-{suffix}.{v}" for k, v in KafkaTopics().model_dump().items()})
    kafka = KafkaSettings(
        bootstrap_servers=os.environ.get("LIGHTMEM_KAFKA__BOOTSTRAP_SERVERS", KafkaSettings().bootstrap_servers),
        app_id=f"test-sleep-{suffix}",
        partitions=2,
        topics=topics,
    )
    return settings_for(tmp_path, server).model_copy(update={"kafka": kafka})


async def _wait(cond: Callable[[], Any], timeout_s: float = 90.0, what: str = "") -> None:
    from aiokafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await cond():
                return
        except KafkaError:  # e.g. no group coordinator yet on a fresh broker
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_request_to_applied_change(tmp_path, encoder, compaction_llm) -> None:  # noqa: ANN001
    from streams.kafka.compaction import (
        compaction_group_id,
        produce_erasure,
        produce_requests,
        run_store_owner,
    )
    from streams.kafka.erasure import user_records
    from streams.kafka.topics import broker_available, consumer_lag, delete_topics, end_offsets, sink_group_id
    from streams.kafka.watermarks import TopicWatermarks
    from streams.ltm import open_store

    settings = _kafka_settings(tmp_path, compaction_llm.server)
    k = settings.kafka
    if not run(broker_available(k.bootstrap_servers, timeout_s=10.0)):
        pytest.fail(f"no Kafka broker at {k.bootstrap_servers}: start one with `lightmem kafka up`", pytrace=False)
    store = open_store(settings.store, encoder.dim)
    old, new = mem("alice", "Alice has a cat named Miso.", 0, 0), mem("alice", "Alice has a cat called Miso.", 1, 2)
    put(store, encoder, [old, new, mem("bob", "Bob has a cat named Miso.", 0, 0)])
    store.close()
    compaction_llm.policy = lambda n, older: [{"id": a, "action": "delete", "reason": "dup"} for a, _, _ in older]

    async def scenario() -> Any:
        stop = asyncio.Event()
        owner = asyncio.create_task(run_store_owner(settings, stop=stop))
        try:
            (first,) = await produce_requests(settings, ["alice"], slot="nightly:1")

            async def changes_applied() -> bool:
                ends = await end_offsets(k, [k.topics.memory_changes])
                lag = await consumer_lag(k, sink_group_id(k), [k.topics.memory_changes])
                return sum(ends.values()) >= 2 and lag[k.topics.memory_changes] == 0

            await _wait(changes_applied, what="the changes to be produced and applied")
            calls = len(compaction_llm.server.requests)
            # the same request again (a crontab firing twice) and a new one with nothing new: no LLM call
            await produce_requests(settings, ["alice"], slot="nightly:1")
            await produce_requests(settings, ["alice"], slot="nightly:2")

            async def requests_done() -> bool:
                lag = await consumer_lag(k, compaction_group_id(settings), [k.topics.compaction_requests])
                return lag[k.topics.compaction_requests] == 0

            await _wait(requests_done, what="the compaction requests to be handled")
            assert len(compaction_llm.server.requests) == calls == 1
            # watermarks live in their compacted topic: any sink instance resumes them
            marks = TopicWatermarks(k)
            await marks.load()
            assert marks.get("alice") == new.updated_at
            assert not (settings.data_dir / "compaction_watermarks.json").exists()
            changes = await read_changes()
            # erasure through the control topic: bob's data stays
            await produce_erasure(settings, "alice")

            async def erased() -> bool:
                lag = await consumer_lag(k, compaction_group_id(settings), [k.topics.control])
                return lag[k.topics.control] == 0

            await _wait(erased, what="the erase_user command to be handled")
            left = await user_records(k, k.topics.memory_changes, "alice")
            await marks.load()
        finally:
            stop.set()
            result = await owner
        return first, result, changes, left, marks

    async def read_changes() -> list[MemoryChange]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            k.topics.memory_changes, bootstrap_servers=k.bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            got = await consumer.getmany(timeout_ms=5000)
            return [MemoryChange.model_validate_json(r.value) for recs in got.values() for r in recs if r.value]
        finally:
            await consumer.stop()

    try:
        first, (sink_stats, agent_stats), changes, left, marks_after_erase = run(scenario())
    finally:
        run(delete_topics(k, list(k.topics.model_dump().values())))
    assert sorted(c.action for c in changes) == ["delete", "update"]
    (absorb,) = [c for c in changes if c.action == "update"]
    assert absorb.memory_id == new.memory_id and absorb.new_record is not None
    assert set(absorb.new_record.source_turn_ids) == set(old.source_turn_ids) | set(new.source_turn_ids)
    assert [c.old_record for c in changes if c.action == "delete"] == [old]
    assert agent_stats.requests == 3 and agent_stats.duplicates == 1 and agent_stats.users == 2
    assert agent_stats.changes == 2 and sink_stats.changes == 2 and agent_stats.erased == 1
    store = open_store(settings.store, encoder.dim)
    try:
        assert store.get_all("alice") == [] and store.count("alice") == 0
        assert len(store.get_all("bob")) == 1  # only alice was compacted and erased
    finally:
        store.close()
    assert Watermarks.in_dir(settings.data_dir).get("alice") is None
    assert marks_after_erase.get("alice") is None  # the watermarks topic holds a tombstone for the user
    assert not (settings.data_dir / "memory_changes.jsonl").exists()  # Kafka: the topic is the change log
    assert left == []  # the erased user's changes (old texts, whole records) are tombstoned


def test_nightly_crontab_emits_one_request_per_active_user() -> None:
    from schemas.records import CompactionRequest, SensoryBufferState
    from streams.kafka.app import SensoryRow
    from streams.kafka.compaction import install_crontab

    class Topic:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, bytes]] = []

        async def send(self, key: bytes, value: bytes) -> Any:
            self.sent.append((key, value))
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    class App:
        def __init__(self) -> None:
            self.out = Topic()
            self.crons: list[tuple[str, Any]] = []

        def topic(self, name: str, **kw: Any) -> Topic:
            self.topic_name = name
            return self.out

        def crontab(self, spec: str, *, timezone: Any = None) -> Any:
            return lambda fn: self.crons.append((spec, timezone)) or fn

    now = time.time()
    rows = {
        "alice": SensoryRow(SensoryBufferState(user_id="alice"), seen_at=now - 60),  # active today
        "bob": SensoryRow(SensoryBufferState(user_id="bob"), seen_at=now - 5 * 86400),  # quiet for days
    }

    class Shell:
        settings = Settings(sleep=SleepSettings(cron_time="03:00", timezone="UTC"))
        app = App()
        sensory_table = {u.encode(): r.dump() for u, r in rows.items()}

        def last_seen(self) -> dict[str, float]:
            return {k.decode(): SensoryRow.load(v, k.decode()).seen_at for k, v in self.sensory_table.items()}

    shell = Shell()
    install_crontab(shell)
    assert shell.app.crons == [("0 3 * * *", shell.app.crons[0][1])] and str(shell.app.crons[0][1]) == "UTC"
    assert shell.app.topic_name == shell.settings.kafka.topics.compaction_requests
    first = run(shell.nightly_compaction())  # type: ignore[attr-defined]
    again = run(shell.nightly_compaction())  # type: ignore[attr-defined]
    assert [r.user_id for r in first] == ["alice"]
    assert [r.request_id for r in again] == [r.request_id for r in first]  # a second fire asks the same
    key, value = shell.app.out.sent[0]
    assert key == b"alice" and CompactionRequest.model_validate_json(value) == first[0]
