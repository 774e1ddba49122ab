"""Short-term-memory extraction: ONE LLM call per STM flush turns a batch of topic segments into a
topic summary plus standalone facts with provenance (``STMSummary``).

Two modes, chosen by ``LLMSettings.base_url``:

- **LLM** (``base_url`` set): any OpenAI-compatible endpoint through the product's one LLM client
  (``streams.llm.LLMClient``: retries, the process-wide concurrency limit, JSON parsing, cost). The response
  must be a JSON object matching ``streams.prompts.ExtractionResponse`` whose fact sources are aliases shown in
  the prompt; content that is not JSON, does not match, or cites no valid alias is asked again like an HTTP
  error is retried. Summaries name their producer and prompt: ``extractor="llm:<model>/extract/v2"``.
- **Extractive** (``base_url`` unset, offline, no LLM): see ``extractive_summary``.

Failure policy ("nothing silent", never an empty result): when no attempt is left, ``extract`` returns an
``ExtractResult`` with ``summary=None`` and a ``DeadLetter`` holding the reason and the original segments; it
does not raise for LLM faults.

Cost: ``StageCost(stage="extraction")`` with ``calls`` = HTTP attempts made, tokens from ``usage`` when the
server reports it, else counted with cl100k_base, ``seconds`` = wall time of the whole ``extract`` call
(retries, backoff and waiting for a slot included), ``items`` = turns in the batch.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from schemas.records import (
    CompressedTurn,
    DeadLetter,
    Fact,
    SourceTurn,
    StageCost,
    STMSummary,
    SummarySentence,
    TopicSegment,
)
from streams import ids
from streams.llm import InvalidOutput, LLMClient, describe_error, parse_model
from streams.prompts import EXTRACTION_PROMPT_VERSION, ExtractedFact, ExtractionResponse, build_extraction_prompt
from streams.segment import turn_label
from streams.settings import LLMSettings
from streams.text import content_words, stem, words

log = logging.getLogger(__name__)

EXTRACTIVE_NAME = "extractive"


class InvalidExtraction(InvalidOutput):
    """The LLM answered, but its extraction cannot be used (not JSON, wrong schema, bad aliases...)."""


class ExtractionFailed(Exception):
    """Extraction gave up: the last error's reason and type, and how many attempts were made."""

    def __init__(self, reason: str, error_type: str, attempts: int) -> None:
        super().__init__(f"extraction failed after {attempts} attempt(s): {error_type}: {reason}")
        self.reason = reason
        self.error_type = error_type
        self.attempts = attempts


@dataclass
class ExtractResult:
    """Exactly one of ``summary`` / ``dead_letter`` is set."""

    summary: STMSummary | None
    dead_letter: DeadLetter | None
    cost: StageCost
    attempts: int
    error: ExtractionFailed | None = None

    @property
    def ok(self) -> bool:
        return self.summary is not None

    def unwrap(self) -> STMSummary:
        """The summary, or raise the ``ExtractionFailed`` that dead-lettered the batch."""
        if self.summary is None:
            assert self.error is not None
            raise self.error
        return self.summary


# -- pure helpers ------------------------------------------------------------------------------


def _turns(segments: Sequence[TopicSegment]) -> list[CompressedTurn]:
    return [turn for segment in segments for turn in segment.turns]


def _who(turn: CompressedTurn) -> str:
    return " ".join((turn.speaker or turn.role).split()) or turn.role


def _has_content(turns: Sequence[CompressedTurn]) -> bool:
    return any(turn.compressed_text.strip() for turn in turns)


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _check_batch(user_id: str, segments: Sequence[TopicSegment]) -> None:
    if not segments:
        raise ValueError("extraction needs at least one segment")
    others = {s.user_id for s in segments if s.user_id != user_id}
    if others:
        raise ValueError(f"segments of other users {sorted(others)} in a batch for user {user_id!r}")


def parse_extraction(content: str | None) -> ExtractionResponse:
    """Parse the LLM's text: strip ```json fences, then JSON, then the response schema."""
    return parse_model(content, ExtractionResponse, what="extraction", error=InvalidExtraction)


def build_summary(
    user_id: str,
    segments: Sequence[TopicSegment],
    response: ExtractionResponse,
    alias_map: dict[int, CompressedTurn],
    extractor_name: str,
    now: datetime,
    index_texts: dict[int, str] | None = None,
) -> STMSummary:
    """Map the LLM's answer back onto the batch: aliases → turn ids and timestamps.

    Unknown aliases are dropped from a fact (with a warning); a fact left with no valid alias, an empty
    summary, or no facts for a batch that has content raise ``InvalidExtraction`` (the caller retries).
    Summary sentences keep their valid aliases as turn ids; a sentence citing none stays in the text but
    credits no turn. ``index_texts`` (fact position → text) sets what the search index reads for a fact.
    """
    index_texts = index_texts or {}
    _check_batch(user_id, segments)
    turns = _turns(segments)
    content = _has_content(turns)
    summary_text = response.summary_text.strip()
    if not summary_text:
        if content:
            raise InvalidExtraction("SchemaViolation", "empty summary")
        summary_text = _topic_line(turns)
    sentences = _summary_sentences(response, alias_map)
    if content and not response.facts and extractor_name != EXTRACTIVE_NAME:
        raise InvalidExtraction("SchemaViolation", "no facts for a batch that has content")

    facts: list[Fact] = []
    for position, extracted in enumerate(response.facts):
        valid = sorted({a for a in extracted.sources if a in alias_map})
        unknown = sorted({a for a in extracted.sources if a not in alias_map})
        if not valid:
            raise InvalidExtraction(
                "InvalidAlias",
                f"fact {position} {extracted.text[:80]!r} cites no valid alias (sources {extracted.sources}, "
                f"valid 1..{len(alias_map)})",
            )
        if unknown:
            log.warning("extraction for %s: dropped unknown aliases %s from fact %d", user_id, unknown, position)
        facts.append(
            Fact(
                text=extracted.text,
                source_turn_ids=[alias_map[a].turn_id for a in valid],
                source_timestamps=[alias_map[a].timestamp for a in valid],
                session_ids=list(dict.fromkeys(alias_map[a].session_id for a in valid)),
                index_text=index_texts.get(position),
            )
        )

    turn_ids = [t.turn_id for t in turns]
    return STMSummary(
        summary_id=ids.summary_id(user_id, turn_ids),
        user_id=user_id,
        session_ids=_unique([t.session_id for t in turns]),
        topic_id=segments[0].segment_id,
        segment_ids=[s.segment_id for s in segments],
        turn_ids=turn_ids,
        summary=summary_text,
        summary_sentences=sentences,
        facts=facts,
        extractor=extractor_name,
        created_at=now,
        turns=[source_turn(t) for t in turns],
    )


def source_turn(turn: CompressedTurn) -> SourceTurn:
    """What a memory keeps of a turn it was made from: where it was said, by whom, and the raw text."""
    return SourceTurn(
        turn_id=turn.turn_id,
        session_id=turn.session_id,
        seq=turn.seq,
        role=turn.role,
        speaker=turn.speaker,
        timestamp=turn.timestamp,
        text=turn.raw_text,
    )


def _summary_sentences(response: ExtractionResponse, alias_map: dict[int, CompressedTurn]) -> list[SummarySentence]:
    if isinstance(response.summary, str):
        return []
    out = []
    for sentence in response.summary:
        valid = sorted({a for a in sentence.sources if a in alias_map})
        if valid:
            out.append(SummarySentence(text=sentence.text, source_turn_ids=[alias_map[a].turn_id for a in valid]))
    return out


# -- offline extractive mode -------------------------------------------------------------------

TOPIC_WORDS = 6
SUMMARY_SENTENCES = 3  # at most this many sentences (from distinct turns) in an extractive summary
SUMMARY_MAX_WORDS = 45  # and at most about this many words
CONTEXT_BEFORE = 1  # neighbouring turns the search index reads with a fact (see _index_text)
CONTEXT_AFTER = 0
CONTEXT_MAX_WORDS = 60  # ... when they are at most this long
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _topic_line(turns: Sequence[CompressedTurn]) -> str:
    """``"<speakers> talked about: <w1>, <w2>, ..."``: the batch's most frequent content words (a stand-in used
    only when no turn has content, then ``"<speakers>: (no content)"``)."""
    speakers = _unique([_who(t) for t in turns])
    counts: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for turn in turns:
        for word in content_words(turn.compressed_text):
            if len(word) < 3 or word.isdigit():
                continue
            counts[word] += 1
            first_seen.setdefault(word, len(first_seen))
    ranked = sorted(counts, key=lambda w: (-counts[w], first_seen[w]))[:TOPIC_WORDS]
    who = ", ".join(speakers)
    if not ranked:
        return f"{who}: (no content)"
    return f"{who} talked about: {', '.join(ranked)}"


CONTRACTION_TAILS = frozenset({"s", "t", "m", "d", "ll", "re", "ve"})  # "That's" → "that", "s"


def participant_names(speakers: Iterable[str]) -> frozenset[str]:
    """The words of the names of the people (or roles) taking part, as ``states_something`` leaves them out."""
    return frozenset(w for speaker in speakers for w in words(speaker))


def states_something(text: str, names: Collection[str] = frozenset()) -> bool:
    """Whether a turn's text is worth a fact: it has a content word — not a stop word, greeting or back-channel
    word, the tail of a contraction ("That's cool!"), nor a word of the name of someone taking part (``names``:
    "Bye Nate!" or "Thanks, Maria. I will!" states nothing) — and a question has at least two ("How are you?" or
    "Anything else?" states nothing).

    The one content test of extraction: offline mode keeps a fact per turn that passes it, and the test LLM
    server (``tests.llm_server``) writes facts by it, so both leave out the same small talk."""
    info = [w for w in content_words(text) if w not in names and w not in CONTRACTION_TAILS]
    if not info:
        return False
    return len(info) >= 2 or not text.rstrip().endswith("?")


def informative(turn: CompressedTurn, names: Collection[str] = frozenset()) -> bool:
    """``states_something`` of the turn's raw text (what compression cut still counts)."""
    return states_something(turn.raw_text, names)


def _salient_sentences(alias_map: dict[int, CompressedTurn], candidates: Sequence[int]) -> list[ExtractedFact]:
    """Up to ``SUMMARY_SENTENCES`` sentences of the batch's informative turns (at most one per turn), chosen by
    how many of the batch's recurring content words they hold, in batch order, each citing its turn."""
    stems = {a: {stem(w) for w in content_words(alias_map[a].compressed_text)} for a in candidates}
    df: Counter[str] = Counter(w for ws in stems.values() for w in ws)
    scored: list[tuple[float, int, str]] = []
    for alias in candidates:
        turn = alias_map[alias]
        for sentence in _SENTENCE_END.split(" ".join(turn.compressed_text.split())):
            terms = {stem(w) for w in content_words(sentence)}
            if not terms:
                continue
            score = sum(df[t] for t in terms) / (len(sentence.split()) ** 0.5)
            scored.append((score, alias, sentence))
    chosen: dict[int, str] = {}
    used = 0
    for _, alias, sentence in sorted(scored, key=lambda x: (-x[0], x[1])):
        n = len(sentence.split())
        if alias in chosen or (chosen and used + n > SUMMARY_MAX_WORDS):
            continue
        chosen[alias] = sentence
        used += n
        if len(chosen) == SUMMARY_SENTENCES:
            break
    return [ExtractedFact(text=_sentence(f"{_who(alias_map[a])}: {chosen[a]}"), sources=[a]) for a in sorted(chosen)]


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else f"{text}."


def _index_text(alias_map: dict[int, CompressedTurn], alias: int) -> str:
    """What the search index reads for a turn's fact: the raw turn, after the raw text of up to
    ``CONTEXT_BEFORE`` preceding and ``CONTEXT_AFTER`` following turns of the same session in the batch that are
    at most ``CONTEXT_MAX_WORDS`` long (a short answer is found through the question it answers; a long turn, such
    as an assistant's essay before a user's remark, would only bury the fact's own words under its length). The
    fact itself still states, and is credited with, only its own turn."""
    turn = alias_map[alias]
    before = range(alias - CONTEXT_BEFORE, alias)
    after = range(alias + 1, alias + 1 + CONTEXT_AFTER)
    parts = [
        alias_map[a]
        for a in (*before, alias, *after)
        if a in alias_map
        and alias_map[a].session_id == turn.session_id
        and (a == alias or len(alias_map[a].raw_text.split()) <= CONTEXT_MAX_WORDS)
    ]
    return "\n".join(f"{_who(t)}: {t.raw_text}" for t in parts)


def extractive_summary(
    user_id: str,
    segments: Sequence[TopicSegment],
    now: datetime,
    pipeline_version: str | None = None,
) -> STMSummary:
    """Offline mode (no LLM), deterministic, labelled ``extractor="extractive"``.

    - facts: one per informative turn (see ``states_something``: greetings, back-channel, addressing the others
      by name and questions that state nothing are left out), ``"<speaker or role>: <compressed_text>"``, with
      that turn as its single source; the search index reads the raw turn with its preceding turn
      (``_index_text``), so what compression cut, and the question a short answer answers, can still be found.
    - summary: up to ``SUMMARY_SENTENCES`` real sentences of the batch (``"<speaker>: <sentence>"``, see
      ``_salient_sentences``), each citing its turn; the topic line of ``_topic_line`` when no turn has content.

    ``pipeline_version`` is accepted for symmetry with ``Extractor``; the summary record does not carry it.
    """
    del pipeline_version
    _check_batch(user_id, segments)
    turns = _turns(segments)
    alias_map = dict(enumerate(turns, start=1))
    names = participant_names(_who(t) for t in turns)
    kept = [a for a, t in alias_map.items() if t.compressed_text.strip() and informative(t, names)]
    sentences = _salient_sentences(alias_map, kept)
    if not sentences and (said := [a for a, t in alias_map.items() if t.compressed_text.strip()]):
        longest = max(said, key=lambda a: (len(alias_map[a].compressed_text), -a))  # a batch of small talk
        sentences = [ExtractedFact(text=_sentence(turn_label(alias_map[longest])), sources=[longest])]
    response = ExtractionResponse(
        summary=sentences or _topic_line(turns),
        facts=[ExtractedFact(text=turn_label(alias_map[a]), sources=[a]) for a in kept],
    )
    index_texts = {pos: _index_text(alias_map, a) for pos, a in enumerate(kept)}
    return build_summary(user_id, segments, response, alias_map, EXTRACTIVE_NAME, now, index_texts)


# -- the extractor -----------------------------------------------------------------------------


def segments_payload(segments: Sequence[TopicSegment]) -> str:
    """The batch as JSON text (a list of TopicSegment objects), as dead letters carry it."""
    return json.dumps([s.model_dump(mode="json") for s in segments], ensure_ascii=False)


class Extractor:
    """Runs the extraction of STM batches; holds the LLM client (none in offline mode)."""

    def __init__(self, settings: LLMSettings, pipeline_version: str, llm: LLMClient | None = None) -> None:
        self.settings = settings
        self.pipeline_version = pipeline_version
        self.prompt_version = EXTRACTION_PROMPT_VERSION
        self.llm = llm if llm is not None else (LLMClient(settings) if settings.base_url else None)
        self.name = self.llm.label(self.prompt_version) if self.llm is not None else EXTRACTIVE_NAME

    @property
    def offline(self) -> bool:
        return self.llm is None

    async def __aenter__(self) -> Extractor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()

    async def extract(self, user_id: str, segments: Sequence[TopicSegment], now: datetime) -> ExtractResult:
        """One STM flush → an ``STMSummary`` or, after bounded retries, a ``DeadLetter``."""
        _check_batch(user_id, segments)
        started = time.perf_counter()
        n_turns = sum(len(s.turns) for s in segments)
        if self.llm is None:
            summary = extractive_summary(user_id, segments, now, self.pipeline_version)
            cost = StageCost(stage="extraction", seconds=time.perf_counter() - started, items=n_turns)
            return ExtractResult(summary=summary, dead_letter=None, cost=cost, attempts=1)

        messages, alias_map = build_extraction_prompt(segments)
        outcome = await self.llm.call_json(
            messages,
            lambda content: build_summary(user_id, segments, parse_extraction(content), alias_map, self.name, now),
            f"extraction for {user_id}",
        )
        calls = outcome.calls
        cost = StageCost(
            stage="extraction",
            calls=calls,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            seconds=time.perf_counter() - started,
            items=n_turns,
        )
        if outcome.value is not None:
            return ExtractResult(summary=outcome.value, dead_letter=None, cost=cost, attempts=calls)

        last = outcome.error
        assert last is not None
        error_type, reason = describe_error(last)
        error = ExtractionFailed(reason, error_type, calls)
        turn_ids = [t.turn_id for s in segments for t in s.turns]
        dead_letter = DeadLetter(
            dlq_id=ids.derived_id("dead_letter", "extract", user_id, ids.summary_id(user_id, turn_ids)),
            stage="extract",
            reason=f"extraction failed after {calls} attempt(s): {error_type}: {reason}",
            error_type=error_type,
            attempts=calls,
            key=user_id,
            payload=segments_payload(segments),
            at=now,
        )
        log.error("extraction for %s dead-lettered: %s", user_id, dead_letter.reason)
        return ExtractResult(summary=None, dead_letter=dead_letter, cost=cost, attempts=calls, error=error)
