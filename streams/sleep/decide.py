"""Decisions: what a new memory does to its nearest earlier memories — update, delete or ignore each.

Two modes, chosen like extraction by ``LLMSettings.base_url``:

- **LLM** (``base_url`` set): ONE call per new memory with its candidates (up to ``max_candidates_per_call``
  per call; more are split over further calls), prompt ``streams.sleep.prompts``, answer validated by
  ``CompactionResponse``. The machinery is the extractor's: ``Decider`` subclasses ``streams.extract.Extractor``,
  so the OpenAI client (its own retries off), the per-process concurrency limit (``max_concurrency``) and the
  rebinding to a new event loop are the same code; retries, backoff and the retryable/non-retryable split are
  those of extraction (``max_retries``, ``backoff_s`` doubling; 5xx/408/409/429, timeouts, invalid output are
  retried, other 4xx are not). When no attempt is left the call yields a ``DeadLetter`` (stage ``compact``,
  payload: the new memory and its candidates) and no decision for those candidates — never a silent "ignore".
  Unknown or repeated ids in an answer are invalid output (retried); an older memory the answer leaves out is
  ignored (logged).
- **Offline rule** (no ``base_url``, model name ``offline-rule``): an older memory whose cosine similarity to the
  new one is at least ``duplicate_threshold`` (default 0.95), or whose normalised text (NFKC, case-folded,
  punctuation and spacing removed) equals the new one's, is a duplicate: it is DELETED as superseded by the newer
  memory (whose provenance absorbs it, see ``streams.sleep.compact``). Everything else is ignored. The rule never
  rewrites text.

Cost: ``StageCost(stage="compaction")`` per call group: HTTP attempts, tokens from ``usage`` (else counted with
cl100k_base), seconds, ``items`` = candidates decided.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import ValidationError

from schemas.records import DeadLetter, MemoryRecord, StageCost
from streams import ids
from streams.extract import Extractor, InvalidExtraction, describe_error
from streams.settings import LLMSettings, SleepSettings
from streams.sleep.prompts import COMPACTION_PROMPT_VERSION, CompactionResponse, build_compaction_prompt

log = logging.getLogger(__name__)

OFFLINE_MODEL = "offline-rule"
Action = Literal["update", "delete", "ignore"]


@dataclass(frozen=True)
class Candidate:
    """An earlier memory of the same user near a new one; ``score`` is their cosine similarity."""

    record: MemoryRecord
    score: float


@dataclass(frozen=True)
class Decision:
    memory_id: str
    action: Action
    text: str | None = None
    reason: str = ""


@dataclass
class DecideResult:
    decisions: list[Decision] = field(default_factory=list)
    cost: StageCost = field(default_factory=lambda: StageCost(stage="compaction"))
    dead_letters: list[DeadLetter] = field(default_factory=list)


class InvalidDecision(InvalidExtraction):
    """The LLM answered, but its decisions cannot be used (not JSON, wrong schema, unknown ids...)."""


# -- offline rule ----------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Text for duplicate detection: NFKC, case-folded, punctuation and runs of spaces → one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def offline_decisions(
    target: MemoryRecord, candidates: Sequence[Candidate], duplicate_threshold: float
) -> list[Decision]:
    """The documented offline rule: duplicates of the newer memory are deleted, everything else ignored."""
    norm = normalise(target.text)
    out = []
    for c in candidates:
        if normalise(c.record.text) == norm:
            out.append(Decision(c.record.memory_id, "delete", reason="same text as a newer memory"))
        elif c.score >= duplicate_threshold:
            out.append(
                Decision(
                    c.record.memory_id, "delete", reason=f"near-duplicate of a newer memory (cosine {c.score:.3f})"
                )
            )
        else:
            out.append(Decision(c.record.memory_id, "ignore", reason=f"not a duplicate (cosine {c.score:.3f})"))
    return out


# -- LLM answers -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def _json(content: str | None) -> object:
    if content is None or not content.strip():
        raise InvalidDecision("EmptyResponse", "the LLM returned no content")
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(text[start : end + 1])
            except json.JSONDecodeError:
                pass
        raise InvalidDecision("InvalidJSON", f"content is not JSON ({exc}): {content[:200]!r}") from exc


def parse_decisions(content: str | None, alias_map: dict[int, MemoryRecord]) -> list[Decision]:
    """The LLM's text → one ``Decision`` per older memory shown (aliases mapped back to memory ids)."""
    try:
        response = CompactionResponse.model_validate(_json(content))
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidDecision("SchemaViolation", f"JSON does not match the compaction schema: {errors}") from exc
    seen: dict[int, Decision] = {}
    for d in response.decisions:
        if d.id not in alias_map:
            raise InvalidDecision("InvalidAlias", f"decision for unknown id {d.id} (valid 1..{len(alias_map)})")
        if d.id in seen:
            raise InvalidDecision("InvalidAlias", f"two decisions for id {d.id}")
        rec = alias_map[d.id]
        seen[d.id] = Decision(rec.memory_id, d.action, d.text if d.action == "update" else None, d.reason)
    missing = [a for a in alias_map if a not in seen]
    if missing:
        log.info("compaction: the LLM left out ids %s; they are ignored", missing)
    return [
        seen.get(a) or Decision(rec.memory_id, "ignore", reason="not decided by the LLM")
        for a, rec in alias_map.items()
    ]


def _payload(target: MemoryRecord, candidates: Sequence[Candidate]) -> str:
    return json.dumps(
        {
            "prompt_version": COMPACTION_PROMPT_VERSION,
            "target": target.model_dump(mode="json"),
            "candidates": [{"score": c.score, "record": c.record.model_dump(mode="json")} for c in candidates],
        },
        ensure_ascii=False,
    )


# -- the decider -----------------------------------------------------------------------------------------


class Decider(Extractor):
    """Decides update/delete/ignore for a new memory's candidates; owns the LLM client and concurrency limit."""

    def __init__(self, llm: LLMSettings, sleep: SleepSettings, pipeline_version: str) -> None:
        super().__init__(llm, pipeline_version)
        self.sleep = sleep
        self.prompt_version = COMPACTION_PROMPT_VERSION
        if self.offline:
            self.name = OFFLINE_MODEL

    async def decide(self, target: MemoryRecord, candidates: Sequence[Candidate], now: datetime) -> DecideResult:
        started = time.perf_counter()
        if not candidates:
            return DecideResult()
        if self.offline:
            decisions = offline_decisions(target, candidates, self.sleep.duplicate_threshold)
            cost = StageCost(stage="compaction", seconds=time.perf_counter() - started, items=len(candidates))
            return DecideResult(decisions, cost)
        size = self.sleep.max_candidates_per_call
        chunks = [list(candidates[i : i + size]) for i in range(0, len(candidates), size)]
        results = await asyncio.gather(*(self._call(target, chunk, now) for chunk in chunks))
        out = DecideResult()
        calls = in_tok = out_tok = 0
        for decisions, dead, (c, i, o) in results:
            out.decisions.extend(decisions)
            if dead is not None:
                out.dead_letters.append(dead)
            calls, in_tok, out_tok = calls + c, in_tok + i, out_tok + o
        out.cost = StageCost(
            stage="compaction",
            calls=calls,
            input_tokens=in_tok,
            output_tokens=out_tok,
            seconds=time.perf_counter() - started,
            items=len(candidates),
        )
        return out

    async def _call(
        self, target: MemoryRecord, candidates: list[Candidate], now: datetime
    ) -> tuple[list[Decision], DeadLetter | None, tuple[int, int, int]]:
        """One prompt with bounded retries → decisions, or a dead letter; plus (calls, input, output tokens)."""
        messages, alias_map = build_compaction_prompt(target, [c.record for c in candidates])
        outcome = await self.call_json(
            messages,
            lambda content: parse_decisions(content, alias_map),
            f"compaction of {target.memory_id} (user {target.user_id})",
        )
        calls, input_tokens, output_tokens = outcome.calls, outcome.input_tokens, outcome.output_tokens
        if outcome.value is not None:
            return outcome.value, None, (calls, input_tokens, output_tokens)

        last = outcome.error
        assert last is not None
        error_type, reason = describe_error(last)
        dead = DeadLetter(
            dlq_id=ids.derived_id(
                "dead_letter",
                "compact",
                target.user_id,
                target.memory_id,
                str(target.version),
                *(f"{c.record.memory_id}@{c.record.version}" for c in candidates),
            ),
            stage="compact",
            reason=f"compaction decision failed after {calls} attempt(s): {error_type}: {reason}",
            error_type=error_type,
            attempts=calls,
            key=target.user_id,
            payload=_payload(target, candidates),
            at=now,
        )
        log.error("compaction of %s (user %s) dead-lettered: %s", target.memory_id, target.user_id, dead.reason)
        return [], dead, (calls, input_tokens, output_tokens)
