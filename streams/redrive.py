"""Dead-letter redrive: reprocess failed records once their cause is gone (an LLM outage, a store outage).

A dead letter keeps its stage and the original payload, so each stage says how to retry it:

- ``extract``: the payload is the STM batch (a JSON list of ``TopicSegment``); redrive runs the same
  ``Extractor.extract`` on it. The summary id is the uuid5 of the batch's turns, so the memories written are
  exactly the ones the batch would have given without the outage.
- ``sink``: the payload is an ``STMSummary``; it is written again.
- ``ingest``: the payload is a raw turn as produced; it is sent again when it now validates (a record that is
  still invalid stays a dead letter).

``select`` filters letters by stage and user. The embedded log and the Kafka topic each have their runner
(``redrive_embedded`` here, ``streams.kafka.dlq.redrive`` for the topic).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError

from schemas.records import DeadLetter, RawTurn, STMSummary, TopicSegment
from streams.dlq import DeadLetterLog
from streams.memories import summary_to_memories, write_memories

if TYPE_CHECKING:  # the CLI imports this module without loading the models or the LLM client
    from streams.pipeline import EmbeddedPipeline

REDRIVABLE = ("extract", "sink", "ingest")


@dataclass
class RedriveReport:
    selected: int = 0
    redriven: int = 0
    failed: int = 0
    skipped: int = 0
    memories: int = 0
    reasons: list[str] = field(default_factory=list)


def select(letters: Iterable[DeadLetter], stage: str | None = None, user: str | None = None) -> list[DeadLetter]:
    return [d for d in letters if (stage is None or d.stage == stage) and (user is None or d.key == user)]


def batch_of(letter: DeadLetter) -> list[TopicSegment]:
    """The STM batch an ``extract`` dead letter holds."""
    return [TopicSegment.model_validate(s) for s in json.loads(letter.payload)]


def summary_of(letter: DeadLetter) -> STMSummary:
    return STMSummary.model_validate_json(letter.payload)


def turn_of(letter: DeadLetter) -> RawTurn | None:
    """The raw turn an ``ingest`` dead letter holds, or None while it is still invalid."""
    try:
        return RawTurn.model_validate_json(letter.payload.encode("latin-1"))
    except (ValidationError, UnicodeEncodeError):
        return None


def describe(letters: Sequence[DeadLetter]) -> list[dict[str, object]]:
    """Rows for ``lightmem dlq list``: id, stage, user, error type, attempts, time, reason (shortened)."""
    return [
        {
            "dlq_id": d.dlq_id,
            "stage": d.stage,
            "user": d.key,
            "error_type": d.error_type,
            "attempts": d.attempts,
            "at": d.at.isoformat(),
            "reason": d.reason if len(d.reason) <= 120 else d.reason[:117] + "...",
        }
        for d in letters
    ]


async def redrive_embedded(
    pipeline: EmbeddedPipeline, stage: str | None = None, user: str | None = None
) -> RedriveReport:
    """Redrive the embedded dead-letter log: each letter that now goes through is removed from it."""
    log = pipeline.dead_letters
    if not isinstance(log, DeadLetterLog):
        raise TypeError("redrive needs the embedded dead-letter log")
    letters = select(log.read(), stage, user)
    report = RedriveReport(selected=len(letters))
    done: set[str] = set()
    now = datetime.now(UTC)
    for d in letters:
        if d.stage == "extract":
            res = await pipeline.stages.extractor.extract(d.key or "", batch_of(d), now)
            if res.summary is None:
                report.failed += 1
                report.reasons.append(res.dead_letter.reason if res.dead_letter else "extraction failed")
                continue
            records = summary_to_memories(res.summary, pipeline.settings.pipeline_version, now)
        elif d.stage == "sink":
            records = summary_to_memories(summary_of(d), pipeline.settings.pipeline_version, now)
        elif d.stage == "ingest" and (turn := turn_of(d)) is not None:
            r = await pipeline.ingest([turn])
            report.memories += len(r.memories)
            done.add(d.dlq_id)
            report.redriven += 1
            continue
        else:
            report.skipped += 1
            continue
        write_memories(records, pipeline.stages.embed, pipeline.store.upsert)
        report.memories += len(records)
        report.redriven += 1
        done.add(d.dlq_id)
    log.remove(done)
    return report
