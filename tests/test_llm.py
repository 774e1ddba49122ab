"""The one LLM client (streams/llm.py): parsing, the process-wide limit shared by every stage, plain-text calls,
and the eval judge on top of it — through the real ``openai`` client against the OpenAI-compatible test server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from schemas.records import TopicSegment
from streams import ids
from streams.eval.judge import Judge
from streams.extract import Extractor
from streams.llm import InvalidOutput, LLMClient, LLMUnavailable, parse_model
from streams.settings import LLMSettings
from tests.factories import compressed_turn
from tests.fixtures_llm import llm_settings
from tests.llm_server import LLMServer


def one_segment(user: str) -> TopicSegment:
    turn = compressed_turn(user, 0, "I adopted a cat named Miso last week", speaker="Ann")
    return TopicSegment(
        segment_id=ids.segment_id(user, [turn.turn_id]),
        user_id=user,
        turns=[turn],
        tokens=turn.compressed_tokens,
        boundary="similarity",
    )


class Pair(BaseModel):
    a: int
    b: str


def test_parse_model_one_path_for_every_stage() -> None:
    assert parse_model('{"a": 1, "b": "x"}', Pair) == Pair(a=1, b="x")
    assert parse_model('```json\n{"a": 2, "b": "y"}\n```', Pair) == Pair(a=2, b="y")
    assert parse_model('Sure, here it is: {"a": 3, "b": "z"} — done.', Pair) == Pair(a=3, b="z")
    for content, kind in [(None, "EmptyResponse"), ("  ", "EmptyResponse"), ("no json", "InvalidJSON")]:
        with pytest.raises(InvalidOutput) as err:
            parse_model(content, Pair)
        assert err.value.error_type == kind
    with pytest.raises(InvalidOutput) as err:
        parse_model('{"a": "one"}', Pair, what="pair")
    assert err.value.error_type == "SchemaViolation" and "pair schema" in err.value.reason and "a:" in err.value.reason


def test_a_client_needs_an_endpoint() -> None:
    with pytest.raises(LLMUnavailable):
        LLMClient(LLMSettings())


async def test_one_limit_for_every_client_of_the_process(llm: LLMServer) -> None:
    """An extractor and a plain client built from the same settings share ONE limit of calls in flight."""
    llm.latency_s = 0.15
    settings = llm_settings(llm, max_concurrency=3)
    extractor = Extractor(settings, "pv")
    other = LLMClient(settings)
    try:
        now = datetime(2024, 1, 1, tzinfo=UTC)
        jobs: list[Any] = [extractor.extract(f"u{i}", [one_segment(f"u{i}")], now) for i in range(6)]
        jobs += [other.call_text([{"role": "user", "content": f"hello {i}"}], f"text {i}") for i in range(6)]
        results = await asyncio.gather(*jobs)
    finally:
        await extractor.aclose()
        await other.aclose()
    assert len(llm.requests) == 12 and llm.max_in_flight == 3  # not 3 per client
    texts = results[6:]
    assert all(r.ok and r.calls == 1 and r.input_tokens > 0 and isinstance(r.value, str) for r in texts)
    cost = texts[0].cost("extraction", items=1)
    assert (cost.calls, cost.items, cost.stage) == (1, 1, "extraction") and cost.input_tokens == texts[0].input_tokens


async def test_call_text_retries_transport_errors_then_reports_the_last(llm: LLMServer) -> None:
    client = LLMClient(llm_settings(llm, max_retries=2))
    try:
        llm.inject("500", "429")
        ok = await client.call_text([{"role": "user", "content": "hi"}], "hi")
        llm.inject("500", "500", "500")
        bad = await client.call_text([{"role": "user", "content": "hi"}], "hi")
    finally:
        await client.aclose()
    assert ok.ok and ok.calls == 3
    assert not bad.ok and bad.calls == 3 and bad.value is None and "500" in str(bad.error)


def test_judge_holds_the_client_and_counts_every_call() -> None:
    def responder(messages: list[dict[str, Any]]) -> str | None:
        text = messages[-1]["content"]
        if text.startswith("You grade a response"):
            return "yes" if "Gold answer: Paris" in text else "no"
        if "Retrieved notes:" in text:
            return "Paris" if "Paris" in text else "I don't know"
        return None

    def qa(qid: str, question: str, answer: str) -> Any:
        return SimpleNamespace(
            question_id=qid,
            question=question,
            answer=answer,
            question_date=None,
            category="1",
            is_abstention=False,
            is_adversarial=False,
            adversarial_answer=None,
        )

    with LLMServer() as server:
        server.register(responder)
        judge = Judge(llm_settings(server))
        assert judge.name == "llm:test-model/judge/1"
        verdicts = judge.judge_many(
            [(qa("q1", "Where does Ann live?", "Paris"), ["Ann lives in Paris."]), (qa("q2", "Pet?", "a cat"), [])]
        )
        again = judge.judge_one(qa("q3", "Where?", "Paris"), ["Paris"])  # a second event loop: a fresh connection
        server.inject("500", "500", "500", "500")
        failed = judge.judge_one(qa("q4", "Where?", "Paris"), ["Paris"])
        judge.close()
    assert [(v.question_id, v.answer, v.correct) for v in verdicts] == [
        ("q1", "Paris", True),
        ("q2", "I don't know", False),
    ]
    assert all(v.cost.calls == 2 and v.cost.input_tokens > 0 for v in verdicts) and again.correct is True
    assert failed.correct is None and failed.cost.failures == 1 and failed.cost.calls == 4 and failed.error
    assert len(server.requests) == 2 * 3 + 4
