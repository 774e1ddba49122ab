"""The dead-letter topic as a table: list, show, redrive (``lightmem dlq ... --kafka``).

Records on the topic are keyed ``<user>/<dlq id>`` (compacted), so the live letters are the latest value per key
and a redriven letter is removed with a tombstone. Redrive (see ``streams.redrive``): an ``extract`` letter's
batch is extracted again and its summary produced to the summaries topic (the sink writes it; ids are those
the batch would have had), a ``sink`` letter's summary is produced again, an ``ingest`` letter's turn is
produced again when it now validates.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from pydantic import ValidationError

from schemas.records import DeadLetter
from streams.extract import Extractor
from streams.redrive import RedriveReport, batch_of, select, summary_of, turn_of
from streams.settings import Settings

from .topics import dumps, ensure_topics, key_of, latest_by_key, make_producer, partition_for, record_key


async def letters(settings: Settings, stage: str | None = None, user: str | None = None) -> list[DeadLetter]:
    """The live dead letters of the topic (tombstoned ones are gone), oldest first."""
    rows = await latest_by_key(settings.kafka, settings.kafka.topics.dead_letters)
    out = []
    for rec in rows.values():
        try:
            out.append(DeadLetter.model_validate_json(rec.value))
        except ValidationError:
            continue  # not a dead letter: nothing to redrive
    return sorted(select(out, stage, user), key=lambda d: d.at)


async def redrive(
    settings: Settings, stage: str | None = None, user: str | None = None, extractor: Extractor | None = None
) -> RedriveReport:
    kafka = settings.kafka
    todo = await letters(settings, stage, user)
    report = RedriveReport(selected=len(todo))
    if not todo:
        return report
    await ensure_topics(kafka)
    own = extractor is None
    extractor = extractor or Extractor(settings.llm, settings.pipeline_version)
    producer = make_producer(kafka, client_id=f"{kafka.app_id}-redrive")
    await producer.start()
    t = kafka.topics
    try:
        for d in todo:
            if d.stage == "extract":
                res = await extractor.extract(d.key or "", batch_of(d), datetime.now(UTC))
                if res.summary is None:
                    report.failed += 1
                    report.reasons.append(res.dead_letter.reason if res.dead_letter else "extraction failed")
                    continue
                out = (t.summaries, dumps(res.summary))
            elif d.stage == "sink":
                out = (t.summaries, summary_of(d).model_dump_json().encode())
            elif d.stage == "ingest" and (turn := turn_of(d)) is not None:
                out = (t.raw_turns, dumps(turn))
            else:
                report.skipped += 1
                continue
            await (await producer.send(out[0], value=out[1], key=key_of(d.key)))
            part = partition_for(key_of(d.key) or b"", kafka.partitions) if d.key else None
            await (await producer.send(t.dead_letters, value=None, key=record_key(d.key, d.dlq_id), partition=part))
            report.redriven += 1
    finally:
        await producer.stop()
        if own:
            await extractor.aclose()
    return report


def redrive_sync(settings: Settings, stage: str | None = None, user: str | None = None) -> RedriveReport:
    return asyncio.run(redrive(settings, stage, user))
