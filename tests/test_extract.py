"""STM extraction: the prompt, provenance mapping, offline mode, and the LLM path through a real
OpenAI-compatible HTTP server (tests/llm_server.py) with injected faults."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from pydantic import TypeAdapter

from schemas.records import CompressedTurn, TopicSegment
from streams import ids
from streams.extract import (
    CONTEXT_MAX_WORDS,
    ExtractionFailed,
    Extractor,
    InvalidExtraction,
    build_summary,
    extractive_summary,
    parse_extraction,
    participant_names,
    states_something,
)
from streams.memories import summary_to_memories
from streams.prompts import (
    EXTRACTION_PROMPT_VERSION,
    ExtractedFact,
    ExtractionResponse,
    build_extraction_prompt,
)
from streams.settings import LLMSettings
from streams.tokens import count_messages_tokens, count_tokens
from tests.factories import compressed_turn
from tests.fixtures_llm import llm_settings
from tests.llm_server import LLMServer, extraction_answer

USER = "user-a"
T0 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
NOW = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
PIPELINE = "lightmem-streams/test"


def turn(
    seq: int,
    text: str,
    *,
    user: str = USER,
    session: str = "s1",
    speaker: str | None = None,
    role: str = "user",
    at: datetime | None = None,
) -> CompressedTurn:
    at = at or T0 + timedelta(minutes=seq)
    return compressed_turn(user, seq, text, session=session, role=role, speaker=speaker, at=at)


def segment(*turns: CompressedTurn, user: str = USER) -> TopicSegment:
    return TopicSegment(
        segment_id=ids.segment_id(user, [t.turn_id for t in turns]),
        user_id=user,
        turns=list(turns),
        tokens=sum(t.compressed_tokens for t in turns),
        boundary="similarity",
    )


def batch(user: str = USER) -> list[TopicSegment]:
    """Two segments, two sessions, three turns (one without a speaker name)."""
    return [
        segment(
            turn(0, "I went to the LGBTQ support group yesterday", user=user, speaker="Caroline"),
            turn(1, "That sounds great, how did it go?", user=user, speaker="Melanie"),
            user=user,
        ),
        segment(
            turn(0, "Remind me to call  the\nadoption agency", user=user, session="s2", role="user"),
            user=user,
        ),
    ]


def all_turns(segments: list[TopicSegment]) -> list[CompressedTurn]:
    return [t for s in segments for t in s.turns]


# -- prompt ---------------------------------------------------------------------------------------


def test_prompt_lists_every_turn_with_aliases_in_order() -> None:
    segments = batch()
    messages, alias_map = build_extraction_prompt(segments)

    assert EXTRACTION_PROMPT_VERSION == "extract/v2"
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "JSON" in messages[0]["content"]
    lines = messages[1]["content"].splitlines()
    turn_lines = [line for line in lines if line.startswith("[")]
    assert turn_lines == [
        "[1] (2023-05-08 13:56) Caroline: I went to the LGBTQ support group yesterday",
        "[2] (2023-05-08 13:57) Melanie: That sounds great, how did it go?",
        "[3] (2023-05-08 13:56) user: Remind me to call the adoption agency",
    ]
    assert list(alias_map) == [1, 2, 3]
    assert [t.turn_id for t in alias_map.values()] == [t.turn_id for t in all_turns(segments)]
    assert '"summary"' in messages[1]["content"] and '"sources"' in messages[1]["content"]
    # pure: same input, same prompt
    assert build_extraction_prompt(segments) == (messages, alias_map)


def test_prompt_keeps_the_timezone_of_the_event() -> None:
    tz = timezone(timedelta(hours=-7))
    segments = [segment(turn(0, "hello there", speaker="Jon", at=datetime(2023, 1, 20, 16, 4, tzinfo=tz)))]
    messages, _ = build_extraction_prompt(segments)
    assert "[1] (2023-01-20 16:04) Jon: hello there" in messages[1]["content"].splitlines()


# -- parsing and provenance ----------------------------------------------------------------------


def test_build_summary_maps_aliases_to_turn_ids_and_timestamps() -> None:
    segments = batch()
    turns = all_turns(segments)
    _, alias_map = build_extraction_prompt(segments)
    response = ExtractionResponse(
        summary="Caroline's support group and an adoption agency call",
        facts=[
            ExtractedFact(text="Caroline went to an LGBTQ support group on 2023-05-07.", sources=[2, 1, 1]),
            ExtractedFact(text="The user wants to call the adoption agency.", sources=[3]),
        ],
    )
    summary = build_summary(USER, segments, response, alias_map, "llm:test-model", NOW)

    assert summary.summary_id == ids.summary_id(USER, [t.turn_id for t in turns])
    assert summary.topic_id == segments[0].segment_id
    assert summary.segment_ids == [s.segment_id for s in segments]
    assert summary.session_ids == ["s1", "s2"]
    assert summary.turn_ids == [t.turn_id for t in turns]
    assert summary.extractor == "llm:test-model"
    assert summary.created_at == NOW
    first, second = summary.facts
    assert first.source_turn_ids == [turns[0].turn_id, turns[1].turn_id]
    assert first.source_timestamps == [turns[0].timestamp, turns[1].timestamp]
    assert second.source_turn_ids == [turns[2].turn_id]
    assert second.source_timestamps == [turns[2].timestamp]


def test_build_summary_drops_unknown_aliases_and_rejects_facts_without_valid_ones() -> None:
    segments = batch()
    turns = all_turns(segments)
    _, alias_map = build_extraction_prompt(segments)
    ok = ExtractionResponse(summary="s", facts=[ExtractedFact(text="a fact", sources=[3, 42])])
    summary = build_summary(USER, segments, ok, alias_map, "llm:m", NOW)
    assert summary.facts[0].source_turn_ids == [turns[2].turn_id]

    bad = ExtractionResponse(summary="s", facts=[ExtractedFact(text="a fact", sources=[0, 999])])
    with pytest.raises(InvalidExtraction) as err:
        build_summary(USER, segments, bad, alias_map, "llm:m", NOW)
    assert err.value.error_type == "InvalidAlias"

    no_sources = ExtractionResponse(summary="s", facts=[ExtractedFact(text="a fact", sources=[])])
    with pytest.raises(InvalidExtraction):
        build_summary(USER, segments, no_sources, alias_map, "llm:m", NOW)


def test_build_summary_empty_facts_only_for_a_batch_without_content() -> None:
    segments = batch()
    _, alias_map = build_extraction_prompt(segments)
    with pytest.raises(InvalidExtraction):
        build_summary(USER, segments, ExtractionResponse(summary="s", facts=[]), alias_map, "llm:m", NOW)

    empty = [segment(turn(0, "", speaker="Caroline"), turn(1, "  ", speaker="Melanie"))]
    _, empty_map = build_extraction_prompt(empty)
    summary = build_summary(USER, empty, ExtractionResponse(summary="", facts=[]), empty_map, "llm:m", NOW)
    assert summary.facts == [] and summary.summary


@pytest.mark.parametrize(
    ("content", "error_type"),
    [
        (None, "EmptyResponse"),
        ("   ", "EmptyResponse"),
        ("not json at all", "InvalidJSON"),
        ('{"summary": "x"}', "SchemaViolation"),
        ('{"summary": "x", "facts": [], "extra": 1}', "SchemaViolation"),
        ('{"summary": "x", "facts": [{"text": "", "sources": [1]}]}', "SchemaViolation"),
        ('{"summary": "x", "facts": [{"text": "t", "sources": ["one"]}]}', "SchemaViolation"),
        ("[1, 2]", "SchemaViolation"),
    ],
)
def test_parse_extraction_rejects_bad_output(content: str | None, error_type: str) -> None:
    with pytest.raises(InvalidExtraction) as err:
        parse_extraction(content)
    assert err.value.error_type == error_type
    assert err.value.reason


def test_parse_extraction_strips_fences() -> None:
    body = '{"summary": "s", "facts": [{"text": "t", "sources": [1]}]}'
    for content in (body, f"```json\n{body}\n```", f"```\n{body}\n```", f"Here you go:\n{body}"):
        assert parse_extraction(content) == ExtractionResponse(
            summary="s", facts=[ExtractedFact(text="t", sources=[1])]
        )


# -- offline extractive mode ---------------------------------------------------------------------


def test_extractive_index_reads_a_short_turn_before_a_fact_but_not_a_long_one() -> None:
    """A short answer is found through the question before it; a user's remark after an assistant's essay is
    indexed on its own words (the essay would bury them under its length)."""
    essay = " ".join(["Here are some smoking tips for brisket, ribs and pork shoulder on any grill."] * 6)
    turns = [
        turn(0, "Which city did you move to last spring?", speaker="Melanie"),
        turn(1, "Rotterdam, near the harbour.", speaker="Caroline"),
        turn(2, essay, role="assistant"),
        turn(3, "Thanks! I just got a smoker today, by the way.", role="user"),
    ]
    assert len(turns[0].raw_text.split()) <= CONTEXT_MAX_WORDS < len(turns[2].raw_text.split())
    summary = extractive_summary(USER, [segment(*turns)], NOW)
    index = {f.source_turn_ids[0]: f.index_text for f in summary.facts}
    assert index[turns[1].turn_id] == f"Melanie: {turns[0].raw_text}\nCaroline: {turns[1].raw_text}"
    assert index[turns[3].turn_id] == f"user: {turns[3].raw_text}"


async def test_extractive_mode_without_base_url() -> None:
    segments = batch() + [segment(turn(5, "", speaker="Melanie"))]
    turns = all_turns(segments)
    extractor = Extractor(LLMSettings(), PIPELINE)
    assert extractor.name == "extractive" and extractor.offline
    result = await extractor.extract(USER, segments, NOW)
    await extractor.aclose()

    assert result.dead_letter is None and result.attempts == 1
    summary = result.unwrap()
    assert summary.extractor == "extractive"
    # the back-channel question states nothing: no fact; the others keep their speaker and cite their turn
    assert [f.text for f in summary.facts] == [
        "Caroline: I went to the LGBTQ support group yesterday",
        "user: Remind me to call the adoption agency",
    ]
    assert [f.source_turn_ids for f in summary.facts] == [[turns[0].turn_id], [turns[2].turn_id]]
    assert [f.source_timestamps for f in summary.facts] == [[turns[0].timestamp], [turns[2].timestamp]]
    assert [f.index_text for f in summary.facts] == [
        f"{t.speaker or t.role}: {t.raw_text}" for t in (turns[0], turns[2])
    ]
    # the summary is real sentences of the batch, each citing the turn it was taken from
    assert summary.summary_sentences
    by_id = {t.turn_id: t for t in turns}
    for sentence in summary.summary_sentences:
        (source,) = sentence.source_turn_ids
        assert sentence.text.rstrip(".").split(": ", 1)[1] in " ".join(by_id[source].compressed_text.split())
        assert sentence.text in summary.summary
    assert turns[1].turn_id not in {t for s in summary.summary_sentences for t in s.source_turn_ids}
    assert summary.turn_ids == [t.turn_id for t in turns]
    assert (result.cost.stage, result.cost.calls, result.cost.input_tokens, result.cost.output_tokens) == (
        "extraction",
        0,
        0,
        0,
    )
    assert result.cost.items == 4
    assert extractive_summary(USER, segments, NOW, PIPELINE) == summary  # deterministic


def test_extractive_summary_picks_sentences_that_carry_the_batch_topic() -> None:
    segments = [
        segment(
            turn(0, "We adopted a puppy, the puppy is called Max", speaker="Ann"),
            turn(1, "A puppy! Max is a lovely name for a puppy", speaker="Bo"),
            turn(2, "Hi!", speaker="Ann"),
            turn(3, "How are you?", speaker="Bo"),
        )
    ]
    summary = extractive_summary(USER, segments, NOW)
    # greetings and empty questions give no fact and no summary sentence
    assert [f.source_turn_ids for f in summary.facts] == [
        [segments[0].turns[0].turn_id],
        [segments[0].turns[1].turn_id],
    ]
    cited = [s.source_turn_ids[0] for s in summary.summary_sentences]
    assert cited == [segments[0].turns[0].turn_id, segments[0].turns[1].turn_id]  # batch order, one per turn
    assert summary.summary == "Ann: We adopted a puppy, the puppy is called Max. Bo: Max is a lovely name for a puppy."


def test_extractive_summary_of_small_talk_still_cites_a_turn() -> None:
    segments = [segment(turn(0, "Hi!", speaker="Ann"), turn(1, "Hello, how are you?", speaker="Bo"))]
    summary = extractive_summary(USER, segments, NOW)
    assert summary.facts == []
    (sentence,) = summary.summary_sentences
    assert sentence.source_turn_ids == [segments[0].turns[1].turn_id]
    records = summary_to_memories(summary, PIPELINE, NOW)  # no fact: the summary is the batch's one memory
    assert [(r.kind, r.source_turn_ids) for r in records] == [("summary", [segments[0].turns[1].turn_id])]


def test_addressing_the_others_by_name_states_nothing() -> None:
    names = participant_names(["Joanna", "Nate"])
    assert not states_something("Bye Nate!", names)
    assert not states_something("Thanks Joanna! I will. Bye!", names)
    assert not states_something("Hey Nate, how's it going?", names)
    assert not states_something("That's cool, Nate! What got you into this biz?", names)
    assert states_something("Nate adopted a turtle", names)
    assert states_something("Bye Nate!")  # the name of someone not taking part is content
    segments = [
        segment(
            turn(0, "Totally! Bye Nate!", speaker="Joanna"),
            turn(1, "I adopted a turtle named Tim", speaker="Nate"),
            turn(2, "Bye Joanna!", speaker="Nate"),
        )
    ]
    offline = extractive_summary(USER, segments, NOW)
    assert [f.source_turn_ids for f in offline.facts] == [[segments[0].turns[1].turn_id]]
    # the test LLM server writes its facts by the same content test
    messages, _ = build_extraction_prompt(segments)
    answer = extraction_answer(messages)
    assert answer is not None and [f["sources"] for f in answer["facts"]] == [[2]]
    # a batch of small talk only: offline stores no fact, the server still writes one (the prompt asks for one)
    small_talk = [segment(turn(0, "Bye Nate!", speaker="Joanna"), turn(1, "Bye Joanna! Take care!", speaker="Nate"))]
    assert extractive_summary(USER, small_talk, NOW).facts == []
    answer = extraction_answer(build_extraction_prompt(small_talk)[0])
    assert answer is not None and [f["sources"] for f in answer["facts"]] == [[2]]


def test_extractive_summary_with_facts_is_not_stored_twice() -> None:
    summary = extractive_summary(USER, batch(), NOW)
    assert summary.facts and summary.summary_sentences
    records = summary_to_memories(summary, PIPELINE, NOW)
    assert [r.kind for r in records] == ["fact"] * len(summary.facts)


async def test_extract_rejects_a_batch_of_another_user() -> None:
    extractor = Extractor(LLMSettings(), PIPELINE)
    with pytest.raises(ValueError):
        await extractor.extract(USER, batch(user="someone-else"), NOW)
    with pytest.raises(ValueError):
        await extractor.extract(USER, [], NOW)


# -- through the OpenAI-compatible server ------------------------------------------------------


async def test_happy_path_through_the_server(llm: LLMServer) -> None:
    segments = batch()
    turns = all_turns(segments)
    async with Extractor(llm_settings(llm), PIPELINE) as extractor:
        assert extractor.name == "llm:test-model/extract/v2"
        result = await extractor.extract(USER, segments, NOW)

    summary = result.unwrap()
    assert result.dead_letter is None and result.attempts == 1
    assert summary.extractor == "llm:test-model/extract/v2"
    assert summary.summary == "Caroline and Melanie and user discussed: I went to the LGBTQ support group yesterday"
    # Melanie's "That sounds great, how did it go?" states nothing: no fact, as in offline mode
    assert [f.text for f in summary.facts] == [
        "Caroline (on 2023-05-08): I went to the LGBTQ support group yesterday",
        "user (on 2023-05-08): Remind me to call the adoption agency",
    ]
    stating = [turns[0], turns[2]]
    assert [f.source_turn_ids for f in summary.facts] == [[t.turn_id] for t in stating]
    assert [f.source_timestamps for f in summary.facts] == [[t.timestamp] for t in stating]
    offline = extractive_summary(USER, segments, NOW)
    assert [f.source_turn_ids for f in offline.facts] == [f.source_turn_ids for f in summary.facts]
    assert result.cost.calls == 1 and result.cost.items == 3
    assert result.cost.input_tokens > 0 and result.cost.output_tokens > 0
    assert result.cost.seconds > 0

    (request,) = llm.requests
    messages, _ = build_extraction_prompt(segments)
    assert request["messages"] == messages
    assert request["model"] == "test-model"
    assert request["response_format"] == {"type": "json_object"}
    assert result.cost.input_tokens == count_messages_tokens(messages)


async def test_identical_prompts_give_identical_summaries(llm: LLMServer) -> None:
    async with Extractor(llm_settings(llm), PIPELINE) as extractor:
        first = await extractor.extract(USER, batch(), NOW)
        second = await extractor.extract(USER, batch(), NOW)
    assert first.unwrap() == second.unwrap()


async def test_missing_usage_is_counted_with_the_tokenizer(llm: LLMServer) -> None:
    segments = batch()
    llm.inject("no_usage")
    async with Extractor(llm_settings(llm), PIPELINE) as extractor:
        result = await extractor.extract(USER, segments, NOW)
    messages, _ = build_extraction_prompt(segments)
    assert result.cost.input_tokens == count_messages_tokens(messages)
    assert result.cost.output_tokens == count_tokens(json.dumps(extraction_answer(messages)))


@pytest.mark.parametrize("fault", ["500", "429", "timeout", "invalid_json", "bad_schema", "bad_alias"])
async def test_each_fault_is_retried_then_succeeds(llm: LLMServer, fault: str) -> None:
    llm.inject(fault)
    settings = llm_settings(llm, timeout_s=0.5 if fault == "timeout" else 5.0)
    async with Extractor(settings, PIPELINE) as extractor:
        result = await extractor.extract(USER, batch(), NOW)
    assert result.dead_letter is None
    assert result.cost.calls == 2 and result.attempts == 2
    assert len(llm.requests) == 2
    assert len(result.unwrap().facts) == 2  # the batch's turns that state something
    assert llm.faults_pending == []


async def test_fenced_json_is_accepted_first_time(llm: LLMServer) -> None:
    llm.inject("fenced")
    async with Extractor(llm_settings(llm), PIPELINE) as extractor:
        result = await extractor.extract(USER, batch(), NOW)
    assert result.cost.calls == 1 and len(result.unwrap().facts) == 2


async def test_mixed_faults_use_all_retries(llm: LLMServer) -> None:
    llm.inject("500", "bad_alias", "429")
    async with Extractor(llm_settings(llm, max_retries=3), PIPELINE) as extractor:
        result = await extractor.extract(USER, batch(), NOW)
    assert result.summary is not None and result.cost.calls == 4


@pytest.mark.parametrize(
    ("fault", "error_type", "in_reason"),
    [
        ("500", "InternalServerError", "500"),
        ("429", "RateLimitError", "429"),
        ("timeout", "APITimeoutError", "timed out"),
        ("invalid_json", "InvalidJSON", "not JSON"),
        ("bad_schema", "SchemaViolation", "facts"),
        ("bad_alias", "InvalidAlias", "999"),
    ],
)
async def test_persistent_fault_becomes_a_dead_letter(
    llm: LLMServer, fault: str, error_type: str, in_reason: str
) -> None:
    segments = batch()
    llm.inject(*[fault] * 3)
    settings = llm_settings(llm, max_retries=2, timeout_s=0.3 if fault == "timeout" else 5.0)
    async with Extractor(settings, PIPELINE) as extractor:
        result = await extractor.extract(USER, segments, NOW)  # no exception

    assert result.summary is None
    assert result.attempts == 3 and result.cost.calls == 3 and len(llm.requests) == 3
    dl = result.dead_letter
    assert dl is not None
    assert dl.stage == "extract" and dl.key == USER and dl.attempts == 3 and dl.at == NOW
    assert dl.error_type == error_type
    assert in_reason in dl.reason and "3 attempt" in dl.reason
    assert TypeAdapter(list[TopicSegment]).validate_json(dl.payload) == segments
    with pytest.raises(ExtractionFailed) as err:
        result.unwrap()
    assert err.value.attempts == 3 and err.value.error_type == error_type


async def test_dead_letter_id_is_deterministic(llm: LLMServer) -> None:
    llm.inject(*["500"] * 4)
    async with Extractor(llm_settings(llm, max_retries=1), PIPELINE) as extractor:
        first = await extractor.extract(USER, batch(), NOW)
        second = await extractor.extract(USER, batch(), NOW)
    assert first.dead_letter is not None and second.dead_letter is not None
    assert first.dead_letter.dlq_id == second.dead_letter.dlq_id


async def test_client_errors_are_not_retried(llm: LLMServer) -> None:
    settings = llm_settings(llm, base_url=f"{llm.base}/no-such-api/v1", max_retries=3)
    async with Extractor(settings, PIPELINE) as extractor:
        result = await extractor.extract(USER, batch(), NOW)
    assert result.dead_letter is not None
    assert result.cost.calls == 1 and result.dead_letter.error_type == "NotFoundError"


async def test_connection_errors_are_retried_then_dead_lettered() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.01, timeout_s=1)
    async with Extractor(settings, PIPELINE) as extractor:
        result = await extractor.extract(USER, batch(), NOW)
    assert result.dead_letter is not None
    assert result.cost.calls == 3 and result.dead_letter.error_type == "APIConnectionError"


async def test_backoff_doubles(llm: LLMServer) -> None:
    llm.inject("500", "500")
    loop = asyncio.get_running_loop()
    async with Extractor(llm_settings(llm, backoff_s=0.2, max_retries=2), PIPELINE) as extractor:
        started = loop.time()
        result = await extractor.extract(USER, batch(), NOW)
        elapsed = loop.time() - started
    assert result.summary is not None and result.cost.calls == 3
    assert elapsed >= 0.2 + 0.4


async def test_concurrency_limit_is_honoured(llm: LLMServer) -> None:
    llm.latency_s = 0.15
    async with Extractor(llm_settings(llm, max_concurrency=2), PIPELINE) as extractor:
        results = await asyncio.gather(*(extractor.extract(f"user-{i}", batch(f"user-{i}"), NOW) for i in range(10)))
    assert all(r.summary is not None for r in results)
    assert len(llm.requests) == 10
    assert llm.max_in_flight == 2


def test_extractor_survives_successive_event_loops(llm: LLMServer) -> None:
    extractor = Extractor(llm_settings(llm), PIPELINE)
    first = asyncio.run(extractor.extract(USER, batch(), NOW))
    second = asyncio.run(extractor.extract(USER, batch(), NOW))
    asyncio.run(extractor.aclose())
    assert first.summary is not None and second.summary is not None
    assert second.cost.calls == 1


# -- the server's control API, in-process and standalone -------------------------------------------


async def test_faults_can_be_queued_over_http(llm: LLMServer) -> None:
    async with httpx.AsyncClient(base_url=llm.base) as client:
        assert (await client.post("/control/faults", json={"faults": ["500", "bad_schema"]})).json() == {"queued": 2}
        bad = await client.post("/control/faults", json={"faults": ["explode"]})
        assert bad.status_code == 422
        async with Extractor(llm_settings(llm), PIPELINE) as extractor:
            result = await extractor.extract(USER, batch(), NOW)
        assert result.cost.calls == 3 and result.summary is not None
        stats = (await client.get("/control/requests")).json()
        assert stats == {"count": 3, "in_flight": 0, "max_in_flight": 1, "faults_pending": 0}
        assert len((await client.get("/control/requests", params={"bodies": 1})).json()["requests"]) == 3
        await client.post("/control/reset")
        assert (await client.get("/control/requests")).json()["count"] == 0


def test_standalone_server_process() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.llm_server", "--port", "0"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("LLM server ready at http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        base = url.removesuffix("/v1")
        with httpx.Client(base_url=base, timeout=5) as client:
            assert client.post("/control/faults", json={"faults": ["429"]}).json() == {"queued": 1}
            messages, _ = build_extraction_prompt(batch())
            body = {"model": "m", "messages": messages}
            assert client.post("/v1/chat/completions", json=body).status_code == 429
            answer = client.post("/v1/chat/completions", json=body).json()
            assert answer["object"] == "chat.completion"
            assert json.loads(answer["choices"][0]["message"]["content"]) == extraction_answer(messages)
            assert answer["usage"]["total_tokens"] > 0
            assert client.get("/control/requests").json()["count"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_server_context_manager_picks_a_free_port() -> None:
    with LLMServer() as a, LLMServer() as b:
        assert a.port != b.port and a.url.endswith("/v1") and a.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{a.base}/v1/models").status_code == 200
    with pytest.raises(ValueError):
        LLMServer().inject("nonsense")


def test_summary_sentences_from_the_llm_credit_only_the_turns_they_cite() -> None:
    segments = batch()
    turns = all_turns(segments)
    alias_map = dict(enumerate(turns, start=1))
    response = parse_extraction(
        json.dumps(
            {
                "summary": [
                    {"text": "Caroline went to an LGBTQ support group.", "sources": [1, 99]},
                    {"text": "They chatted.", "sources": []},
                ],
                "facts": [{"text": "Caroline went to the LGBTQ support group.", "sources": [1]}],
            }
        )
    )
    summary = build_summary(USER, segments, response, alias_map, "llm:test", NOW)
    assert summary.summary == "Caroline went to an LGBTQ support group. They chatted."
    assert [(s.text, s.source_turn_ids) for s in summary.summary_sentences] == [
        ("Caroline went to an LGBTQ support group.", [turns[0].turn_id])  # unknown alias 99 dropped
    ]
    records = summary_to_memories(summary, PIPELINE, NOW)
    (memory,) = [r for r in records if r.kind == "summary"]
    assert memory.source_turn_ids == [turns[0].turn_id]  # not every turn of the batch
    assert memory.event_timestamps == [turns[0].timestamp, turns[0].timestamp]
