"""Sleep-time decisions: update / delete / ignore for each (new memory, earlier candidate) pair.

- **Exact rule first** (no call, both modes): a candidate whose normalised text equals the new memory's is a
  duplicate and is deleted (``model="exact-rule"`` in LLM mode); the new memory absorbs its provenance.
- **LLM** (``llm.base_url`` set): BATCHED. The new memories of a run are grouped by neighbourhood — targets whose
  candidate sets overlap (or that are each other's candidates) form one group, so a shared candidate is shown
  once — and groups are packed into calls up to ``sleep.max_prompt_tokens`` prompt tokens (a group larger than
  the budget is split between consecutive targets). Every memory gets an integer alias
  (``streams.sleep.prompts``). The answer is validated PER TARGET: a target whose decisions are unusable
  (unknown alias, a pair it was not shown, an update without text, two decisions for one pair) is retried alone,
  then dead-lettered; the rest of the batch stands. An answer that cannot be read at all (not JSON, no
  ``decisions`` list, a decision naming no new memory of the batch, every target invalid) is asked again by the
  LLM client; when that still fails, each target of a batch of several is retried alone. Transport errors that
  outlast the client's retries dead-letter the batch's targets (one dead letter each, stage ``compact``).
  Pairs the LLM does not name are ignored (recorded as ``ignore`` changes, like every decision).
- **Offline rule** (no ``base_url``): duplicates of the newer memory (same normalised text, or cosine ≥
  ``sleep.duplicate_threshold``) are deleted, everything else ignored. No call.

Every call goes through the process's one ``streams.llm.LLMClient`` (retries, the concurrency limit, cost).
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
from streams.llm import InvalidOutput, LLMClient, describe_error, parse_model, validation_text
from streams.settings import LLMSettings, SleepSettings
from streams.sleep.prompts import (
    COMPACTION_PROMPT_VERSION,
    COMPACTION_SYSTEM_PROMPT,
    BatchPrompt,
    CompactionResponse,
    PairDecision,
    PromptTarget,
    build_compaction_prompt,
    format_memory_line,
)
from streams.tokens import count_messages_tokens, count_tokens

log = logging.getLogger(__name__)

OFFLINE_MODEL = "offline-rule"
EXACT_MODEL = "exact-rule"
Action = Literal["update", "delete", "ignore"]
PROMPT_OVERHEAD_TOKENS = 64  # message framing and the answer instructions after the memory lines


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
    model: str | None = None  # who decided, when not the decider itself (the exact rule)


Plan = tuple[MemoryRecord, Sequence[Candidate]]


@dataclass
class DecideResult:
    """Decisions per target memory id (a dead-lettered target keeps only its exact-rule decisions), dead letters
    (one per target whose LLM decision failed), cost, and how many batched prompts were sent."""

    decisions: dict[str, list[Decision]] = field(default_factory=dict)
    cost: StageCost = field(default_factory=lambda: StageCost(stage="compaction"))
    dead_letters: list[DeadLetter] = field(default_factory=list)
    batches: int = 0


class InvalidDecision(InvalidOutput):
    """The LLM answered, but its decisions cannot be used (not JSON, wrong schema, unknown ids...)."""


# -- rules without a call ----------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Text for duplicate detection: NFKC, case-folded, punctuation and runs of spaces → one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_decisions(target: MemoryRecord, candidates: Sequence[Candidate]) -> tuple[list[Decision], list[Candidate]]:
    """The exact rule: candidates with the target's normalised text are deleted; the others are returned."""
    norm = normalise(target.text)
    decided, rest = [], []
    for c in candidates:
        if normalise(c.record.text) == norm:
            decided.append(
                Decision(c.record.memory_id, "delete", reason="same text as a newer memory", model=EXACT_MODEL)
            )
        else:
            rest.append(c)
    return decided, rest


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


# -- batching ----------------------------------------------------------------------------------------------


def neighbourhoods(targets: Sequence[PromptTarget]) -> list[list[int]]:
    """Indices of ``targets`` grouped by overlapping neighbourhoods (shared candidates, or one target being
    another's candidate); groups in order of their first target, targets in order within a group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for t in targets:
        root = find(t.record.memory_id)
        for c in t.candidates:
            other = find(c.memory_id)
            if other != root:
                parent[other] = root
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(find(t.record.memory_id), []).append(i)
    return list(groups.values())


def plan_batches(targets: Sequence[PromptTarget], max_prompt_tokens: int) -> list[list[PromptTarget]]:
    """Pack neighbourhoods into batches whose prompt stays within ``max_prompt_tokens`` (estimated from the
    lines each target and each not-yet-shown candidate add). A neighbourhood is split only when it alone is over
    the budget; a single target always makes a batch of its own."""
    fixed = count_tokens(COMPACTION_SYSTEM_PROMPT) + PROMPT_OVERHEAD_TOKENS
    cache: dict[str, int] = {}

    def line_tokens(record: MemoryRecord) -> int:
        if record.memory_id not in cache:
            cache[record.memory_id] = count_tokens(format_memory_line(10_000, record)) + 1
        return cache[record.memory_id]

    def cost(t: PromptTarget, shown: set[str]) -> int:
        compare = 2 + 3 * len(t.candidates)  # "    compare with: a, b, ..." and its newline
        new = [c for c in t.candidates if c.memory_id not in shown]
        own = 0 if t.record.memory_id in shown else line_tokens(t.record)
        return own + compare + sum(line_tokens(c) for c in new)

    batches: list[list[PromptTarget]] = []
    current: list[PromptTarget] = []
    shown: set[str] = set()
    used = fixed

    def close() -> None:
        nonlocal current, shown, used
        if current:
            batches.append(current)
        current, shown, used = [], set(), fixed

    for group in neighbourhoods(targets):
        members = [targets[i] for i in group]
        probe = set(shown)
        need = 0
        for t in members:
            need += cost(t, probe)
            probe |= {t.record.memory_id, *(c.memory_id for c in t.candidates)}
        if current and used + need > max_prompt_tokens:
            close()
        for t in members:
            extra = cost(t, shown)
            if current and used + extra > max_prompt_tokens:
                close()
                extra = cost(t, shown)
            current.append(t)
            used += extra
            shown |= {t.record.memory_id, *(c.memory_id for c in t.candidates)}
    close()
    return batches


def prompt_tokens(targets: Sequence[PromptTarget]) -> int:
    """Prompt tokens of one batch's messages (cl100k_base, as ``plan_batches`` bounds them)."""
    return count_messages_tokens(build_compaction_prompt(targets).messages)


# -- reading an answer -------------------------------------------------------------------------------------


def parse_batch(content: str | None, prompt: BatchPrompt) -> dict[int, list[Decision] | InvalidDecision]:
    """The LLM's text → per target alias: its decisions (one per compared memory; pairs not named are ignored),
    or the ``InvalidDecision`` that makes that target's answer unusable.

    Raises ``InvalidDecision`` when the answer as a whole is unusable: not JSON, not ``{"decisions": [...]}``,
    a decision that names no new memory of the batch, or no target with usable decisions.
    """
    response = parse_model(content, CompactionResponse, what="compaction", error=InvalidDecision)
    named: dict[int, dict[int, PairDecision]] = {a: {} for a in prompt.targets}
    errors: dict[int, InvalidDecision] = {}
    for position, item in enumerate(response.decisions):
        new = item.get("new")
        if not isinstance(new, int) or new not in prompt.targets:
            raise InvalidDecision(
                "InvalidAlias",
                f"decision {position} names no new memory of the batch ({new!r}; new: 1..{len(prompt.targets)})",
            )
        if new in errors:
            continue
        try:
            pair = PairDecision.model_validate(item)
        except ValidationError as exc:
            errors[new] = InvalidDecision(
                "SchemaViolation", f"decision {position} for new memory {new}: {validation_text(exc)}"
            )
            continue
        if pair.old not in prompt.compare[new]:
            errors[new] = InvalidDecision(
                "InvalidAlias", f"new memory {new} is not compared with {pair.old} (shown: {list(prompt.compare[new])})"
            )
        elif pair.old in named[new]:
            errors[new] = InvalidDecision("InvalidAlias", f"two decisions for the pair ({new}, {pair.old})")
        else:
            named[new][pair.old] = pair
    if len(errors) == len(prompt.targets):
        first = next(iter(errors.values()))
        raise InvalidDecision(first.error_type, "; ".join(e.reason for e in errors.values())[:1000])
    out: dict[int, list[Decision] | InvalidDecision] = {}
    for alias in prompt.targets:
        if alias in errors:
            out[alias] = errors[alias]
            continue
        decisions = []
        for old in prompt.compare[alias]:
            rec = prompt.aliases[old]
            chosen = named[alias].get(old)
            if chosen is None:
                decisions.append(Decision(rec.memory_id, "ignore", reason="left as it is by the LLM"))
            else:
                text = chosen.text if chosen.action == "update" else None
                decisions.append(Decision(rec.memory_id, chosen.action, text, chosen.reason))
        out[alias] = decisions
    return out


def dead_letter_payload(target: MemoryRecord, candidates: Sequence[Candidate]) -> str:
    return json.dumps(
        {
            "prompt_version": COMPACTION_PROMPT_VERSION,
            "target": target.model_dump(mode="json"),
            "candidates": [{"score": c.score, "record": c.record.model_dump(mode="json")} for c in candidates],
        },
        ensure_ascii=False,
    )


# -- the decider -------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    batches: int = 0


class Decider:
    """Decides update/delete/ignore for the new memories of a run; holds the LLM client (none offline)."""

    def __init__(
        self, llm: LLMSettings, sleep: SleepSettings, pipeline_version: str, client: LLMClient | None = None
    ) -> None:
        self.sleep = sleep
        self.pipeline_version = pipeline_version
        self.prompt_version = COMPACTION_PROMPT_VERSION
        self.llm = client if client is not None else (LLMClient(llm) if llm.base_url else None)
        self.name = self.llm.label(self.prompt_version) if self.llm is not None else OFFLINE_MODEL

    @property
    def offline(self) -> bool:
        return self.llm is None

    async def aclose(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()

    async def decide(self, plans: Sequence[Plan], now: datetime) -> DecideResult:
        """Decisions for every ``(target, candidates)`` plan: rules first, then batched LLM calls."""
        started = time.perf_counter()
        out = DecideResult()
        pairs = sum(len(c) for _, c in plans)
        todo: list[PromptTarget] = []
        scores: dict[tuple[str, str], float] = {}
        for target, candidates in plans:
            if not candidates:
                continue
            if self.llm is None:
                out.decisions[target.memory_id] = offline_decisions(target, candidates, self.sleep.duplicate_threshold)
                continue
            exact, rest = exact_decisions(target, candidates)
            out.decisions[target.memory_id] = exact
            if rest:
                todo.append(PromptTarget(target, tuple(c.record for c in rest)))
                scores.update({(target.memory_id, c.record.memory_id): c.score for c in rest})
        tally = _Tally()
        if todo:
            batches = plan_batches(todo, self.sleep.max_prompt_tokens)
            results = await asyncio.gather(*(self._batch(b, now, tally, scores) for b in batches))
            for decided, dead in results:
                for memory_id, decisions in decided.items():
                    out.decisions[memory_id].extend(decisions)
                out.dead_letters.extend(dead)
        out.batches = tally.batches
        out.cost = StageCost(
            stage="compaction",
            calls=tally.calls,
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            seconds=time.perf_counter() - started,
            items=pairs,
        )
        return out

    async def _batch(
        self, targets: list[PromptTarget], now: datetime, tally: _Tally, scores: dict[tuple[str, str], float]
    ) -> tuple[dict[str, list[Decision]], list[DeadLetter]]:
        """One call for a batch; invalid targets retried alone; dead letters for what still fails."""
        assert self.llm is not None
        prompt = build_compaction_prompt(targets)
        user = targets[0].record.user_id
        outcome = await self.llm.call_json(
            prompt.messages,
            lambda content: parse_batch(content, prompt),
            f"compaction of {len(targets)} new memor{'y' if len(targets) == 1 else 'ies'} (user {user})",
        )
        tally.calls += outcome.calls
        tally.input_tokens += outcome.input_tokens
        tally.output_tokens += outcome.output_tokens
        tally.batches += 1
        decided: dict[str, list[Decision]] = {}
        dead: list[DeadLetter] = []
        alone: list[PromptTarget] = []
        if outcome.value is not None:
            for alias, result in outcome.value.items():
                target = next(t for t in targets if t.record.memory_id == prompt.targets[alias].memory_id)
                if isinstance(result, InvalidDecision):
                    if len(targets) > 1:
                        log.warning("compaction of %s: %s; retrying it alone", target.record.memory_id, result.reason)
                        alone.append(target)
                    else:
                        dead.append(self._dead_letter(target, result, outcome.calls, now, scores))
                else:
                    decided[target.record.memory_id] = result
        else:
            error = outcome.error
            assert error is not None
            if isinstance(error, InvalidOutput) and len(targets) > 1:
                alone.extend(targets)
            else:
                dead.extend(self._dead_letter(t, error, outcome.calls, now, scores) for t in targets)
        if alone:
            for sub_decided, sub_dead in await asyncio.gather(*(self._batch([t], now, tally, scores) for t in alone)):
                decided.update(sub_decided)
                dead.extend(sub_dead)
        return decided, dead

    def _dead_letter(
        self,
        target: PromptTarget,
        error: BaseException,
        calls: int,
        now: datetime,
        scores: dict[tuple[str, str], float],
    ) -> DeadLetter:
        error_type, reason = describe_error(error)
        rec = target.record
        candidates = [Candidate(c, scores.get((rec.memory_id, c.memory_id), 0.0)) for c in target.candidates]
        dead = DeadLetter(
            dlq_id=ids.derived_id(
                "dead_letter",
                "compact",
                rec.user_id,
                rec.memory_id,
                str(rec.version),
                *(f"{c.memory_id}@{c.version}" for c in target.candidates),
            ),
            stage="compact",
            reason=f"compaction decision failed after {calls} attempt(s): {error_type}: {reason}",
            error_type=error_type,
            attempts=calls,
            key=rec.user_id,
            payload=dead_letter_payload(rec, candidates),
            at=now,
        )
        log.error("compaction of %s (user %s) dead-lettered: %s", rec.memory_id, rec.user_id, dead.reason)
        return dead
