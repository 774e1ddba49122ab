"""Replay: rebuild long-term memory from the raw-turn log into a fresh collection.

The raw-turn topic is the log of record (kept forever), so memory can be rebuilt with a new embedding
model, prompt or compression rate. Replay reads the topic with a fresh consumer (no group, nothing
committed) from the beginning up to the end offsets captured at start, validates each record as the
worker does, and feeds the turns in offset order through the SAME stage functions via
``streams.pipeline.EmbeddedPipeline`` (collection = the new one, optionally another embedder); at the
end every user's buffers are flushed. An erasure barrier in the log drops everything of its user before it
(buffers, memories already replayed), so replay after an erasure never brings the user back. Ids are
deterministic, so with nothing changed the new collection holds exactly the point ids the stream produced.

Idle gaps: the worker flushes a user idle for ``settings.stm.idle_timeout_s``. Replay reproduces that
from the records' timestamps: a user's turn more than the idle timeout after their previous one first
flushes that user (``idle_gaps=True``, the default). A stream that ingested a backlog without such
pauses is reproduced exactly; a worker that fell behind a live producer may have cut differently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from schemas.records import ControlRecord, DeadLetter, RawTurn
from streams.dlq import DeadLetterLog
from streams.idle import idle
from streams.settings import Settings

from .codec import decode
from .keys import KeyRing, KeyShredded, unseal
from .topics import BrokerUnavailable, TopicReader, broker_available, error_dead_letter, spec_of

log = logging.getLogger(__name__)


class CollectionNotEmpty(RuntimeError):
    """Replay targets a collection that already holds memories."""


@dataclass
class ReplayReport:
    collection: str
    turns: int = 0
    users: int = 0
    dead_letters: int = 0
    erasures: int = 0
    shredded: int = 0
    memory_ids: list[str] = field(default_factory=list)
    end_offsets: dict[int, int] = field(default_factory=dict)


def replay_settings(settings: Settings, collection: str, embedder: Path | str | None = None) -> Settings:
    update: dict[str, object] = {"store": settings.store.model_copy(update={"collection": collection})}
    if embedder is not None:
        update["embedding"] = settings.embedding.model_copy(update={"model": str(embedder)})
    return settings.model_copy(update=update)


async def replay_topic(
    settings: Settings,
    collection: str,
    *,
    embedder: Path | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    idle_gaps: bool = True,
    chunk: int = 256,
    allow_existing: bool = False,
) -> ReplayReport:
    """Rebuild memory from the raw-turn topic into ``collection``; see the module docstring."""
    from streams.pipeline import EmbeddedPipeline

    kafka = settings.kafka
    if not await broker_available(kafka.bootstrap_servers):
        raise BrokerUnavailable(f"no Kafka broker answers at {kafka.bootstrap_servers}")
    rs = replay_settings(settings, collection, embedder)
    report = ReplayReport(collection=collection)
    topic = kafka.topics.raw_turns
    reader = TopicReader(kafka, topic, client_id=f"{kafka.app_id}-replay")
    await reader.start()
    pipeline: EmbeddedPipeline | None = None
    try:
        spec = spec_of(kafka, "raw_turns")
        keys = KeyRing(kafka)
        if not reader.partitions:
            raise RuntimeError(f"topic {topic} does not exist at {kafka.bootstrap_servers}")

        pipeline = EmbeddedPipeline(rs)
        if not allow_existing and pipeline.store.count() > 0:
            raise CollectionNotEmpty(
                f"collection {collection!r} already holds {pipeline.store.count()} memories: replay into a new one"
            )
        idle_s = settings.stm.idle_timeout_s
        last_ts: dict[str, int] = {}
        pending: list[RawTurn] = []
        users: set[str] = set()
        memory_ids: dict[str, str] = {}  # memory id → user

        async def ingest() -> None:
            if pending:
                r = await pipeline.ingest(list(pending))
                memory_ids.update({m.memory_id: m.user_id for m in r.memories})
                report.dead_letters += len(r.dead_letters)
                pending.clear()

        total = 0
        async for batch in reader.batches(max_records=chunk):
            total = total or sum(reader.end[p] - reader.begin.get(p, 0) for p in reader.end)
            for rec in batch:
                got = decode(spec, rec, "ingest")
                if isinstance(got, DeadLetter):
                    pipeline.dead_letters.send(got)
                    report.dead_letters += 1
                    continue
                if isinstance(got, ControlRecord):  # the erasure barrier: nothing of the user before it
                    user = got.user_id
                    pending[:] = [t for t in pending if t.user_id != user]
                    pipeline.forget_user(user)
                    pipeline.store.delete_user(user)
                    if isinstance(pipeline.dead_letters, DeadLetterLog):  # e.g. a bad record of theirs
                        pipeline.dead_letters.remove({d.dlq_id for d in pipeline.dead_letters.read() if d.key == user})
                    for mid in [m for m, u in memory_ids.items() if u == user]:
                        del memory_ids[mid]
                    last_ts.pop(user, None)
                    report.erasures += 1
                    continue
                assert isinstance(got, RawTurn)
                try:
                    turn = await unseal(got, keys)
                except KeyShredded:  # an erased user's turn: unreadable by design
                    report.shredded += 1
                    continue
                except (ValueError, ValidationError) as exc:
                    pipeline.dead_letters.send(error_dead_letter(rec, "ingest", exc))
                    report.dead_letters += 1
                    continue
                prev = last_ts.get(turn.user_id)
                if idle_gaps and idle(None if prev is None else prev / 1000, rec.timestamp / 1000, idle_s):
                    await ingest()  # this user's earlier turns first, then the idle flush the worker did
                    r = await pipeline.flush(turn.user_id)
                    memory_ids.update({m.memory_id: m.user_id for m in r.memories})
                    report.dead_letters += len(r.dead_letters)
                last_ts[turn.user_id] = rec.timestamp
                users.add(turn.user_id)
                pending.append(turn)
                report.turns += 1
            if len(pending) >= chunk:
                await ingest()
            if progress is not None:
                progress(len(batch), total)
        report.end_offsets = dict(reader.end)
        await ingest()
        r = await pipeline.flush()
        memory_ids.update({m.memory_id: m.user_id for m in r.memories})
        report.dead_letters += len(r.dead_letters)
        report.users = len(users)
        report.memory_ids = list(memory_ids)
        log.info(
            "replayed %d turns of %d users into %s: %d memories",
            report.turns,
            report.users,
            collection,
            len(memory_ids),
        )
        return report
    finally:
        await reader.stop()
        if pipeline is not None:
            await pipeline.aclose()
