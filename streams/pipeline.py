"""The embedded runner: the three memory stages wired in-process (no broker, no server).

It calls exactly the stage functions the Faust app calls: ``compress_turns``, ``segment.segment``,
``stm.add``/``stm.flush``, ``Extractor.extract``, ``summary_to_memories`` and ``write_memories``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from schemas import DeadLetter, MemoryRecord, RawTurn, SensoryBufferState, STMBufferState, TopicSegment
from streams import segment as sensory
from streams import stm
from streams.cost import CostLedger
from streams.dlq import DeadLetterLog, DeadLetterSink
from streams.ltm import MemoryStore, open_store
from streams.memories import summary_to_memories, write_memories
from streams.settings import Settings
from streams.stages import Stages

__all__ = ["EmbeddedPipeline", "IngestReport"]


@dataclass
class IngestReport:
    turns: int = 0
    segments: int = 0
    extractions: int = 0
    memories: list[MemoryRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def merge(self, other: IngestReport) -> None:
        self.turns += other.turns
        self.segments += other.segments
        self.extractions += other.extractions
        self.memories.extend(other.memories)
        self.dead_letters.extend(other.dead_letters)


class EmbeddedPipeline:
    """Per-user sensory and STM buffers in memory, LTM in Qdrant on disk (one owner process)."""

    def __init__(
        self,
        settings: Settings,
        *,
        stages: Stages | None = None,
        store: MemoryStore | None = None,
        dead_letters: DeadLetterSink | None = None,
    ) -> None:
        self.settings = settings
        self.stages = stages or Stages(settings)
        self.store = store or open_store(settings.store, self.stages.encoder.dim)
        self.dead_letters = dead_letters or DeadLetterLog(settings.data_dir / "dead_letters.jsonl")
        self.ledger = CostLedger()
        self.sensory: dict[str, SensoryBufferState] = {}
        self.stm: dict[str, STMBufferState] = {}

    # -- ingest ---------------------------------------------------------------------------
    async def ingest(self, turns: Sequence[RawTurn]) -> IngestReport:
        """Run turns through sensory memory and STM; extract and store every batch that fills."""
        report = IngestReport(turns=len(turns))
        if not turns:
            return report
        with self.ledger.timed("compression", len(turns)):
            compressed = self.stages.compress(turns)
        batches: list[list[TopicSegment]] = []
        now = datetime.now(UTC)
        with self.ledger.timed("segmentation", len(turns)):
            self.stages.embed([sensory.turn_label(t) for t in compressed])  # one batched pass, then cache hits
            for turn in compressed:
                buf = self.sensory.get(turn.user_id) or SensoryBufferState(user_id=turn.user_id)
                segments, self.sensory[turn.user_id] = sensory.segment(buf, turn, self.stages.segmenter)
                report.segments += len(segments)
                batches.extend(self._to_stm(segments, now))
        report.merge(await self._extract_and_store(batches))
        return report

    def _to_stm(self, segments: Sequence[TopicSegment], now: datetime) -> list[list[TopicSegment]]:
        batches = []
        for seg in segments:
            buf = self.stm.get(seg.user_id) or stm.empty(seg.user_id)
            batch, self.stm[seg.user_id] = stm.add(buf, seg, now, self.settings.stm)
            if batch:
                batches.append(batch)
        return batches

    async def flush(self, user_id: str | None = None) -> IngestReport:
        """Flush sensory and STM buffers (one user, or all) into long-term memory now."""
        users = [user_id] if user_id else sorted(set(self.sensory) | set(self.stm))
        report = IngestReport()
        batches: list[list[TopicSegment]] = []
        now = datetime.now(UTC)
        with self.ledger.timed("segmentation"):
            for u in users:
                if u in self.sensory:
                    segments, self.sensory[u] = sensory.flush(self.sensory[u], self.stages.segmenter)
                    report.segments += len(segments)
                    batches.extend(self._to_stm(segments, now))
                if u in self.stm:
                    batch, self.stm[u] = stm.flush(self.stm[u])
                    if batch:
                        batches.append(batch)
        report.merge(await self._extract_and_store(batches))
        return report

    async def flush_idle(self, now: datetime | None = None) -> IngestReport:
        """Flush the STM buffers of users idle past the timeout (the embedded twin of the worker's timer)."""
        now = now or datetime.now(UTC)
        batches = []
        for u, buf in list(self.stm.items()):
            if stm.due(buf, now, self.settings.stm):
                batch, self.stm[u] = stm.flush(buf)
                if batch:
                    batches.append(batch)
        return await self._extract_and_store(batches)

    async def _extract_and_store(self, batches: Sequence[Sequence[TopicSegment]]) -> IngestReport:
        report = IngestReport()
        if not batches:
            return report
        now = datetime.now(UTC)
        results = await asyncio.gather(*(self.stages.extractor.extract(b[0].user_id, b, now) for b in batches))
        records: list[MemoryRecord] = []
        for res in results:
            self.ledger.record(res.cost)
            report.extractions += 1
            if res.dead_letter is not None:
                self.dead_letters.send(res.dead_letter)
                report.dead_letters.append(res.dead_letter)
            if res.summary is not None:
                records.extend(summary_to_memories(res.summary, self.settings.pipeline_version, now))
        emb, ups = write_memories(records, self.stages.embed, self.store.upsert)
        self.ledger.record(emb)
        self.ledger.record(ups)
        report.memories.extend(records)
        return report

    def forget_user(self, user_id: str) -> None:
        """Drop a user's buffered (not yet extracted) sensory and STM state."""
        self.sensory.pop(user_id, None)
        self.stm.pop(user_id, None)

    async def aclose(self) -> None:
        try:
            await self.stages.aclose()
        finally:
            self.store.close()
