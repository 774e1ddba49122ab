"""Optional LLM-as-judge accuracy, reported beside evidence recall (never instead of it).

For one question: an *answer* call reads the retrieved items (the same texts whose tokens ``tokens@k`` counts)
and answers; a *judge* call compares that answer with the gold answer and says ``yes`` or ``no``. The judge
prompt follows the published LongMemEval/LoCoMo practice of one rubric per question type (our own wording):
temporal questions tolerate off-by-one day counts, knowledge updates accept the latest value, preference
questions are judged against a rubric, abstention/adversarial questions are correct when the answer declines.

Calls go to any OpenAI-compatible endpoint (``LLMSettings.base_url``) through the product's one LLM client
(``streams.llm.LLMClient``: retries, the process-wide concurrency limit, token counts from ``usage`` or
cl100k_base); the questions of a call to ``judge_many`` run concurrently under that limit.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.llm import LLMClient, describe_error
from streams.settings import LLMSettings

__all__ = [
    "JUDGE_PROMPT_VERSION",
    "JudgeUnavailable",
    "Judge",
    "JudgeCost",
    "JudgeVerdict",
    "answer_messages",
    "judge_messages",
    "parse_verdict",
]

JUDGE_PROMPT_VERSION = "judge/1"

ANSWER_SYSTEM = (
    "You answer questions about a person's past conversations. Use only the retrieved notes you are given; "
    "they may be fragments, and newer notes override older ones."
)

_RUBRICS: dict[str, str] = {
    "default": (
        "Say yes if the response contains the gold answer or something equivalent to it (paraphrases and extra "
        "correct detail are fine). Say no if it gives a different answer, misses a required part, or only says "
        "it does not know."
    ),
    "temporal-reasoning": (
        "This question asks about dates, durations or order. Say yes if the response gives the gold answer; "
        "a count of days, weeks or months that is off by one from the gold count is still correct. Say no for "
        "any other value, or if it does not commit to an answer."
    ),
    "knowledge-update": (
        "The person's information changed over time and the gold answer is the latest value. Say yes if the "
        "response states the gold (latest) value, even if it also mentions the older one as old. Say no if it "
        "gives only the older value or another value."
    ),
    "single-session-preference": (
        "The gold answer is a rubric describing what a personalised response should do. Say yes if the "
        "response follows the rubric by using the person's stated preferences; it need not cover every point. "
        "Say no if it ignores or contradicts them."
    ),
    "abstention": (
        "This question cannot be answered from the conversations (it asks about something never mentioned). "
        "Say yes if the response says the information is not available or declines to answer. Say no if it "
        "gives a specific answer."
    ),
    "adversarial": (
        "This question is a trap: it attributes something to the wrong person or asks about something never "
        "said. Say yes if the response says this was not mentioned or cannot be answered. Say no if it "
        "answers as if the premise were true, in particular with the given wrong answer."
    ),
}


class JudgeUnavailable(RuntimeError):
    """--judge was asked for without an OpenAI-compatible endpoint."""


def rubric_for(category: str, *, is_abstention: bool = False, is_adversarial: bool = False) -> str:
    if is_abstention:
        return _RUBRICS["abstention"]
    if is_adversarial:
        return _RUBRICS["adversarial"]
    return _RUBRICS.get(category, _RUBRICS["default"])


def answer_messages(question: str, contexts: Sequence[str], question_date: datetime | None) -> list[dict[str, str]]:
    notes = "\n".join(f"- {c}" for c in contexts) if contexts else "(nothing was retrieved)"
    today = f"Today is {question_date:%Y-%m-%d (%A)}.\n" if question_date else ""
    user = (
        f"Retrieved notes:\n{notes}\n\n{today}Question: {question}\n\n"
        "Answer briefly (one or two sentences). If the notes do not contain the answer, say you don't know."
    )
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]


def judge_messages(
    question: str,
    gold: str | None,
    response: str,
    category: str,
    *,
    is_abstention: bool = False,
    is_adversarial: bool = False,
    wrong_answer: str | None = None,
) -> list[dict[str, str]]:
    rubric = rubric_for(category, is_abstention=is_abstention, is_adversarial=is_adversarial)
    lines = [
        "You grade a response to a question about past conversations.",
        f"Question: {question}",
        f"Gold answer: {gold if gold not in (None, '') else '(none: the question is unanswerable)'}",
    ]
    if wrong_answer:
        lines.append(f"Known wrong answer: {wrong_answer}")
    lines += [f"Response: {response}", "", rubric, "Reply with exactly one word: yes or no."]
    return [{"role": "user", "content": "\n".join(lines)}]


_YES_NO = re.compile(r"\b(yes|no)\b", re.I)


def parse_verdict(text: str | None) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` when the judge said neither (first word that matches wins)."""
    m = _YES_NO.search(text or "")
    return None if m is None else m.group(1).lower() == "yes"


@dataclass
class JudgeCost:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    failures: int = 0

    def add(self, other: JudgeCost) -> None:
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.seconds += other.seconds
        self.failures += other.failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3),
            "failures": self.failures,
        }


@dataclass
class JudgeVerdict:
    question_id: str
    answer: str
    correct: bool | None  # None: the judge's reply was neither yes nor no, or a call failed
    raw_verdict: str = ""
    error: str | None = None
    cost: JudgeCost = field(default_factory=JudgeCost)

    def as_dict(self) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "answer": self.answer,
            "correct": self.correct,
            "raw_verdict": self.raw_verdict,
            "error": self.error,
        }


class Judge:
    """Answers and grades questions through an OpenAI-compatible endpoint; holds the LLM client."""

    def __init__(self, settings: LLMSettings, client: LLMClient | None = None) -> None:
        if not settings.base_url:
            raise JudgeUnavailable(
                "--judge needs an OpenAI-compatible endpoint: set LIGHTMEM_LLM__BASE_URL (and LIGHTMEM_LLM__MODEL, "
                "LIGHTMEM_LLM__API_KEY); recall metrics need no LLM and run without --judge"
            )
        self.settings = settings
        self.model = settings.model
        self.llm = client if client is not None else LLMClient(settings)
        self.name = self.llm.label(JUDGE_PROMPT_VERSION)

    async def _chat(self, messages: list[dict[str, str]], max_tokens: int, cost: JudgeCost, label: str) -> str:
        outcome = await self.llm.call_text(messages, label, max_tokens=max_tokens)
        cost.calls += outcome.calls
        cost.input_tokens += outcome.input_tokens
        cost.output_tokens += outcome.output_tokens
        cost.seconds += outcome.seconds
        if outcome.error is not None:
            raise outcome.error
        return outcome.value or ""

    async def judge(self, qa: Any, contexts: Sequence[str]) -> JudgeVerdict:
        """Answer ``qa`` (a ``streams.loaders.QAItem``) from ``contexts`` and grade the answer."""
        cost = JudgeCost()
        try:
            answer = await self._chat(
                answer_messages(qa.question, contexts, qa.question_date), 200, cost, f"answer {qa.question_id}"
            )
            raw = await self._chat(
                judge_messages(
                    qa.question,
                    qa.answer,
                    answer.strip(),
                    qa.category,
                    is_abstention=qa.is_abstention,
                    is_adversarial=qa.is_adversarial,
                    wrong_answer=qa.adversarial_answer if qa.is_adversarial else None,
                ),
                5,
                cost,
                f"judge {qa.question_id}",
            )
        except Exception as exc:  # noqa: BLE001 - a failed question is recorded, never dropped silently
            cost.failures += 1
            error_type, reason = describe_error(exc)
            return JudgeVerdict(qa.question_id, "", None, "", f"{error_type}: {reason}", cost)
        return JudgeVerdict(qa.question_id, answer.strip(), parse_verdict(raw), raw.strip(), None, cost)

    def judge_one(self, qa: Any, contexts: Sequence[str]) -> JudgeVerdict:
        """``judge`` from synchronous code."""
        return self.judge_many([(qa, contexts)])[0]

    def judge_many(self, jobs: Sequence[tuple[Any, Sequence[str]]]) -> list[JudgeVerdict]:
        """Judge ``(qa, contexts)`` pairs concurrently (bounded by the client's limit); results in input order."""
        if not jobs:
            return []

        async def run_all() -> list[JudgeVerdict]:
            try:
                return list(await asyncio.gather(*(self.judge(qa, contexts) for qa, contexts in jobs)))
            finally:
                await self.llm.aclose()  # its connections belong to this loop; the next call builds new ones

        return asyncio.run(run_all())

    def close(self) -> None:
        """Nothing to release between calls (``judge_many`` closes its connections); kept for callers."""


def summarise(verdicts: Sequence[dict[str, Any]], groups: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Accuracy per group: ``groups`` maps question id → group names joined by ``|`` (see ``run``)."""
    buckets: dict[str, list[bool | None]] = {}
    for v in verdicts:
        for g in groups.get(v["question_id"], "all").split("|"):
            buckets.setdefault(g, []).append(v.get("correct"))
    out: dict[str, dict[str, Any]] = {}
    for g, vals in buckets.items():
        graded = [x for x in vals if x is not None]
        out[g] = {
            "n": len(vals),
            "graded": len(graded),
            "ungraded": len(vals) - len(graded),
            "accuracy": (sum(graded) / len(graded)) if graded else None,
        }
    return out
