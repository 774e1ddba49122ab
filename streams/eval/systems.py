"""The systems under evaluation behind one interface: ``fit(conv)`` indexes (or ingests) one user's history and
returns what that cost; ``retrieve(user_id, query, k)`` answers like any ``streams.eval.baselines.Retriever``.

LightMem is one more system: ``fit`` ingests through ``streams.api.Memory`` (``add_turns`` in chunks, ``flush``)
and ``retrieve`` is ``Memory.search``. A memory is handed to a reader as ``[YYYY-MM-DD] text`` (first event date;
a range when its turns span days) and credited with the turns it states (``MemoryRecord.source_turn_ids``); the
turns of its STM batch ride along as ``batch_turn_ids`` for the generous figure reported apart.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from schemas.records import StageCost
from streams.api import Memory
from streams.eval.baselines import BM25Retriever, FullTextRetriever, NaiveRAGRetriever, RetrievedItem
from streams.loaders import Conversation
from streams.settings import Settings
from streams.stages import Stages

COST_FIELDS = ("calls", "input_tokens", "output_tokens", "seconds", "items")


def cost_json(cost: StageCost) -> dict[str, Any]:
    """A stage cost as the checkpoint stores it."""
    return {f: getattr(cost, f) for f in COST_FIELDS}


def cost_diff(after: Mapping[str, StageCost], before: Mapping[str, StageCost]) -> dict[str, dict[str, Any]]:
    out = {}
    for stage, cost in after.items():
        prev = before.get(stage)
        out[stage] = {f: getattr(cost, f) - (getattr(prev, f) if prev else 0) for f in COST_FIELDS}
    return out


class System(Protocol):
    unbounded: bool

    def fit(self, conv: Conversation) -> dict[str, Any]: ...

    def retrieve(self, user_id: str, query: str, k: int) -> list[RetrievedItem]: ...

    def close(self) -> None: ...


class BaselineSystem:
    """FullText, BM25 or NaiveRAG over raw turns (NaiveRAG embeds with the memory's own encoder and settings)."""

    def __init__(self, name: str, embed: Callable[[list[str]], Any] | None = None) -> None:
        self.name = name
        if name == "fulltext":
            self.retriever: Any = FullTextRetriever()
        elif name == "bm25":
            self.retriever = BM25Retriever()
        elif name == "naiverag":
            assert embed is not None
            self.retriever = NaiveRAGRetriever(embed)
        else:
            raise ValueError(f"no baseline {name!r}")
        self.unbounded = bool(getattr(self.retriever, "unbounded", False))
        self.prefetch_queries = getattr(self.retriever, "prefetch_queries", None)

    def fit(self, conv: Conversation) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.retriever.fit(conv.turns)
        seconds = time.perf_counter() - t0
        stage = "embedding" if self.name == "naiverag" else "indexing"
        return {
            "seconds": seconds,
            "cost": {stage: {**dict.fromkeys(COST_FIELDS, 0), "seconds": seconds, "items": len(conv.turns)}},
        }

    def retrieve(self, user_id: str, query: str, k: int) -> list[RetrievedItem]:
        return list(self.retriever.retrieve(user_id, query, k))

    def close(self) -> None:
        pass


class CountingStages(Stages):
    """``Stages`` that also sums the cl100k tokens of raw and compressed turn texts it compresses (the achieved
    compression ratio, measured on what the pipeline actually compressed)."""

    raw_tokens: int = 0
    compressed_tokens: int = 0
    turns: int = 0

    def compress(self, turns):  # noqa: ANN001, ANN201 - same signature as Stages.compress
        out = super().compress(turns)
        self.raw_tokens += sum(t.raw_tokens for t in out)
        self.compressed_tokens += sum(t.compressed_tokens for t in out)
        self.turns += len(out)
        return out


@dataclass(frozen=True)
class MemoryItem(RetrievedItem):
    """A retrieved memory: credited with ``source_turn_ids`` (what it states); ``batch_turn_ids`` are the turns of
    the STM batch it came from."""

    kind: str = "fact"
    batch_turn_ids: tuple[str, ...] = ()


def memory_reader_text(record: Any) -> str:
    """What an answerer is handed for a memory: its event date (range) and text."""
    ts = sorted(record.event_timestamps)
    first, last = ts[0], ts[-1]
    when = f"{first:%Y-%m-%d}" if first.date() == last.date() else f"{first:%Y-%m-%d}..{last:%Y-%m-%d}"
    return f"[{when}] {record.text}"


class LightMemSystem:
    """The embedded pipeline on one cell's settings; the Memory opens on first use (a resumed run opens none)."""

    unbounded = False
    dated = True

    def __init__(self, settings: Settings, stages: Callable[[], CountingStages], chunk_turns: int) -> None:
        self.settings = settings
        self._new_stages = stages
        self.chunk_turns = chunk_turns
        self._mem: Memory | None = None
        self._stages: CountingStages | None = None
        self._batches: dict[str, dict[str, tuple[str, ...]]] = {}  # user → summary id → batch turn ids
        self.on_chunk: Callable[[int], None] | None = None
        self.opened = 0

    @property
    def memory(self) -> Memory:
        if self._mem is None:
            self._stages = self._new_stages()
            self._mem = Memory(self.settings, stages=self._stages)
            self.opened += 1
        return self._mem

    def fit(self, conv: Conversation) -> dict[str, Any]:
        """Ingest one user's turns (a user cut short by a crash starts clean); the ingest record."""
        mem, user = self.memory, conv.user_id
        stages = self._stages
        assert stages is not None
        mem.delete_user(user)
        before = mem.costs()
        raw0, comp0, n0 = stages.raw_tokens, stages.compressed_tokens, stages.turns
        dead = 0
        batches: dict[str, list[str]] = {}
        t0 = time.perf_counter()
        for i in range(0, len(conv.turns), self.chunk_turns):
            chunk = conv.turns[i : i + self.chunk_turns]
            report = mem.add_turns(chunk)
            dead += len(report.dead_letters)
            self._note_batches(batches, report.memories)
            if self.on_chunk is not None:
                self.on_chunk(len(chunk))
        report = mem.flush(user)
        dead += len(report.dead_letters)
        self._note_batches(batches, report.memories)
        seconds = time.perf_counter() - t0
        position = {t.turn_id: i for i, t in enumerate(conv.turns)}
        self.load_batches(user, {"batches": {s: [position.get(t, t) for t in ts] for s, ts in batches.items()}}, conv)
        return {
            "turns": len(conv.turns),
            "seconds": seconds,
            "cost": cost_diff(mem.costs(), before),
            "compression": {
                "turns": stages.turns - n0,
                "raw_tokens": stages.raw_tokens - raw0,
                "compressed_tokens": stages.compressed_tokens - comp0,
            },
            "memories": len(mem.get_all(user)),
            "dead_letters": dead,
            "batches": {s: [position.get(t, t) for t in ts] for s, ts in batches.items()},
        }

    @staticmethod
    def _note_batches(batches: dict[str, list[str]], memories: Sequence[Any]) -> None:
        for m in memories:  # a batch's turns, as far as its memories cite them
            turns = batches.setdefault(m.summary_id, [])
            turns.extend(t for t in m.source_turn_ids if t not in turns)

    def load_batches(self, user_id: str, ingest: Mapping[str, Any], conv: Conversation) -> None:
        """The batch map of an ingest record (turn positions in ``conv.turns``)."""
        self._batches[user_id] = {
            s: tuple(conv.turns[t].turn_id if isinstance(t, int) else t for t in ts)
            for s, ts in (ingest.get("batches") or {}).items()
        }

    def retrieve(self, user_id: str, query: str, k: int, as_of: datetime | None = None) -> list[RetrievedItem]:
        """``Memory.search``; ``as_of`` (the question's date) lets relative dates in the question count."""
        batches = self._batches.get(user_id, {})
        return [
            MemoryItem(
                text=memory_reader_text(h.record),
                source_turn_ids=list(h.record.source_turn_ids),
                score=h.score,
                kind=h.record.kind,
                batch_turn_ids=batches.get(h.record.summary_id, tuple(h.record.source_turn_ids)),
            )
            for h in self.memory.search(query, user_id=user_id, limit=k, as_of=as_of)
        ]

    def compact(self, user_id: str) -> dict[str, Any]:
        """The sleep-time update over one user's memories; its cost and what it changed."""
        report = self.memory.compact([user_id], full=True)
        actions: Counter[str] = Counter()
        for run in report.users:
            actions.update(run.actions)
        return {
            "cost": cost_json(report.cost),
            "memories": len(self.memory.get_all(user_id)),
            "compaction": {
                "targets": sum(u.targets for u in report.users),
                "changes": dict(actions),
                "dead_letters": sum(len(u.dead_letters) for u in report.users),
            },
        }

    def close(self) -> None:
        if self._mem is not None:
            self._mem.close()
            self._mem = None
