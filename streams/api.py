"""The Python API, shaped like what mem0 users know, and the one way into long-term memory.

The CLI, the evaluation and the HTTP service all call this object; nothing else opens the store.

from streams.api import Memory
m = Memory()                                  # Settings() from LIGHTMEM_* env, embedded mode
m.add([{"role": "user", "content": "I adopted a cat named Miso"}], user_id="alice", session_id="s1")
m.flush(user_id="alice")
for hit in m.search("what pet does alice have?", user_id="alice"):
    print(hit.score, hit.record.text, hit.record.source_turn_ids)
m.compact()                                   # the sleep-time update; m.history(memory_id), m.revert(change_id)
m.erase("alice")                              # everything stored about alice, everywhere

Models load on first use: a process that only searches loads the encoder, never the compressor or the LLM client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np

from schemas import DeadLetter, MemoryChange, MemoryRecord, RawTurn, SourceTurn, StageCost
from streams import ids
from streams.asker import asker_roles
from streams.dates import time_window
from streams.dlq import DeadLetterLog
from streams.erase import ErasureReport, erase_user
from streams.ltm import MissingUserError, ScoredMemory
from streams.pipeline import EmbeddedPipeline, IngestReport
from streams.ranking import search_preferring
from streams.redrive import RedriveReport, redrive_embedded
from streams.settings import Settings
from streams.sleep.apply import RevertError, apply_changes, build_revert
from streams.sleep.changelog import ChangeLog
from streams.sleep.compact import CompactionReport, UserRun, run_compaction
from streams.stages import Stages

__all__ = [
    "AmbiguousChange",
    "ChangeNotFound",
    "CompactionReport",
    "ErasureReport",
    "IngestReport",
    "Memory",
    "MemoryInfo",
    "MemoryView",
    "MissingUserError",
    "RevertError",
    "RevertResult",
    "ScoredMemory",
]

SearchMode = Literal["hybrid", "dense", "sparse"]


def _require_user(user_id: str | None) -> str:
    if not user_id or not str(user_id).strip():
        raise MissingUserError("a user_id is required: every memory read and write is scoped to one user")
    return str(user_id)


class ChangeNotFound(LookupError):
    """No change in the change log has this id (or id prefix)."""


class AmbiguousChange(LookupError):
    """An id prefix names more than one change."""


@dataclass(frozen=True)
class MemoryView:
    """One memory as it is now (``record``; None once deleted), its sleep-time changes, oldest first, and the turns
    it was made from (``source_turns``; a deleted memory's as they were before the delete)."""

    memory_id: str
    user_id: str
    record: MemoryRecord | None
    changes: list[MemoryChange] = field(default_factory=list)
    caused: list[MemoryChange] = field(default_factory=list)  # changes to other memories this one caused

    def _last(self) -> MemoryRecord | None:
        """The record as it is, or (deleted) as it was before the change that removed it."""
        if self.record is not None:
            return self.record
        return next((c.old_record for c in reversed(self.changes) if c.old_record is not None), None)

    @property
    def source_turn_ids(self) -> list[str]:
        last = self._last()
        return list(last.source_turn_ids) if last is not None else []

    @property
    def source_turns(self) -> list[SourceTurn]:
        """The turns the memory was made from, with their raw text (empty for memories written before memories
        kept them)."""
        last = self._last()
        return list(last.source_turns) if last is not None else []


@dataclass(frozen=True)
class RevertResult:
    """``reverted``: the change undone; ``revert``: the 'revert' change that undid it (new, or an earlier one
    when ``already`` is true: a revert is done once, unless forced)."""

    reverted: MemoryChange
    revert: MemoryChange
    already: bool = False


@dataclass(frozen=True)
class MemoryInfo:
    """What a Memory runs with (names only; asking loads the models)."""

    compressor: str
    extractor: str
    store: str
    collection: str


class _SessionCounters:
    """Next turn sequence number per (user, session), persisted so turn ids never collide across runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}

    def take(self, user_id: str, session_id: str, n: int) -> int:
        key = f"{user_id}\x1f{session_id}"
        start = self._next.get(key, 0)
        self._next[key] = start + n
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self._next))
        return start

    def forget_user(self, user_id: str) -> None:
        self._next = {k: v for k, v in self._next.items() if not k.startswith(f"{user_id}\x1f")}
        if self.path.exists():
            self.path.write_text(json.dumps(self._next))


class Memory:
    """Embedded LightMem memory: add conversation turns, search long-term memory per user."""

    def __init__(self, settings: Settings | None = None, *, stages: Stages | None = None) -> None:
        self.settings = settings or Settings()
        self._runner = asyncio.Runner()
        self.pipeline = EmbeddedPipeline(self.settings, stages=stages)
        self._counters = _SessionCounters(self.settings.data_dir / "sessions.json")

    # -- write ----------------------------------------------------------------------------
    def add(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        user_id: str,
        session_id: str = "default",
        timestamp: datetime | None = None,
    ) -> IngestReport:
        """Add turns. ``messages`` is a string (one user turn) or a list of {"role", "content"} dicts,
        optionally with "name" (speaker) and "timestamp" (aware datetime or ISO 8601 with offset)."""
        user_id = _require_user(user_id)
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        base = timestamp or datetime.now(UTC)
        if base.tzinfo is None:
            raise ValueError("timestamp must be timezone-aware")
        start = self._counters.take(user_id, session_id, len(msgs))
        turns = []
        for i, m in enumerate(msgs):
            if "content" not in m or "role" not in m:
                raise ValueError(f"message {i} needs 'role' and 'content'")
            ts = m.get("timestamp") or base + timedelta(milliseconds=i)
            turns.append(
                RawTurn(
                    turn_id=ids.turn_id(user_id, session_id, start + i),
                    user_id=user_id,
                    session_id=session_id,
                    seq=start + i,
                    role=str(m["role"]),
                    speaker=m.get("name"),
                    content=str(m["content"]),
                    timestamp=ts,
                )
            )
        return self.add_turns(turns)

    def add_turns(self, turns: Sequence[RawTurn]) -> IngestReport:
        """Add already-built RawTurn records (loaders, replays)."""
        for t in turns:
            _require_user(t.user_id)
        return self._runner.run(self.pipeline.ingest(turns))

    def next_seq(self, user_id: str, session_id: str, n: int = 1) -> int:
        """Reserve ``n`` turn sequence numbers in a session (as ``add`` does); returns the first."""
        return self._counters.take(_require_user(user_id), session_id, n)

    def flush(self, user_id: str | None = None) -> IngestReport:
        """Extract whatever is buffered into long-term memory now (one user, or everyone)."""
        return self._runner.run(self.pipeline.flush(user_id))

    def redrive(self, stage: str | None = None, user_id: str | None = None) -> RedriveReport:
        """Reprocess dead letters (of one stage / user) whose cause is gone; those that go through leave the log."""
        return self._runner.run(redrive_embedded(self.pipeline, stage, user_id))

    def run_idle(self, now_ts: float | None = None) -> IngestReport:
        """Flush the buffers of users idle past the timeout (what a timer calls; ``now_ts``: epoch seconds)."""
        now = datetime.fromtimestamp(now_ts, UTC) if now_ts is not None else datetime.now(UTC)
        return self._runner.run(self.pipeline.flush_idle(now))

    # -- read -----------------------------------------------------------------------------
    def search(
        self,
        query: str,
        user_id: str,
        limit: int = 10,
        *,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        mode: SearchMode | None = None,
        query_vector: np.ndarray | None = None,
        as_of: datetime | None = None,
    ) -> list[ScoredMemory]:
        """The ``limit`` best memories of one user for ``query`` (hybrid, dense or sparse; default from settings),
        optionally only those of events between ``time_from`` and ``time_to`` (aware datetimes).

        ``query_vector``: the query's embedding when the caller has it already (e.g. embedded in one pass with
        other queries); computed here otherwise.

        ``as_of`` is when the question is asked: a relative date in the query ("two weeks ago", "last Thursday",
        "in May"; ``streams.dates.time_window``) then ranks memories of events in that span higher (the ranking
        within the span fused with the plain ranking, reciprocal-rank fusion); no memory is left out for its
        date, since people often tell of an event some time after it. A first-person query ("when did I ...") likewise
        ranks the memories of the user's own turns higher (``streams.asker``; ``store.prefer_asker``)."""
        user_id = _require_user(user_id)
        if mode not in (None, "hybrid", "dense", "sparse"):
            raise ValueError(f"mode must be hybrid, dense or sparse, not {mode!r}")
        for name, ts in (("time_from", time_from), ("time_to", time_to), ("as_of", as_of)):
            if ts is not None and ts.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")
        vector = query_vector
        if vector is None and mode != "sparse":
            vector = self.pipeline.stages.encoder.embed_one(query)
        window = time_window(query, as_of) if as_of is not None else None
        return search_preferring(
            self.pipeline.store,
            user_id,
            query,
            vector,
            limit,
            mode=mode,
            time_from=time_from,
            time_to=time_to,
            span=(window.start, window.end) if window is not None else None,
            roles=asker_roles(query) if self.settings.store.prefer_asker else None,
            depth=self.settings.store.prefetch,  # fused as deep as the engine fuses its branches
        )

    def get_all(self, user_id: str, limit: int | None = None) -> list[MemoryRecord]:
        return self.pipeline.store.get_all(_require_user(user_id), limit)

    def get(self, memory_id: str, user_id: str) -> MemoryView | None:
        """One memory of a user with its change history; None when neither the store nor the log knows it."""
        user_id = _require_user(user_id)
        found = self.pipeline.store.get(user_id, [memory_id])
        log = self._changelog()
        changes = [c for c in log.for_memory(memory_id) if c.user_id == user_id]
        if not found and not changes:
            return None
        caused = [c for c in log.caused_by(memory_id) if c.user_id == user_id]
        return MemoryView(memory_id, user_id, found[0] if found else None, changes, caused)

    def history(self, memory_id: str) -> list[MemoryChange]:
        """Every sleep-time change to one memory, oldest first (deletes and reverts included)."""
        return self._changelog().for_memory(memory_id)

    def users(self) -> list[str]:
        """The users with memories in the store."""
        return self.pipeline.store.users()

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters of this data directory (records that could not be processed, with their reason)."""
        sink = self.pipeline.dead_letters
        return sink.read() if isinstance(sink, DeadLetterLog) else []

    # -- sleep-time update ----------------------------------------------------------------------
    def compact(
        self,
        users: Sequence[str] | None = None,
        *,
        full: bool = False,
        after_user: Callable[[UserRun], None] | None = None,
    ) -> CompactionReport:
        """Run the sleep-time update now (every user in the store, or ``users``); ``full`` ignores the watermarks.
        ``after_user`` is called as each user completes (progress). Its cost lands in ``costs()``."""
        for u in users or ():
            _require_user(u)
        stages = self.pipeline.stages
        report = self._runner.run(
            run_compaction(self.settings, self.pipeline.store, stages.embed, users, full=full, after_user=after_user)
        )
        self.pipeline.ledger.record(report.cost)
        return report

    def change(self, change_id: str) -> MemoryChange:
        """One change by its id (or an unambiguous prefix); ``ChangeNotFound`` / ``AmbiguousChange`` otherwise."""
        log = self._changelog()
        matches = log.find(change_id)
        if not matches:
            raise ChangeNotFound(f"no change {change_id} in {log.path}")
        if len(matches) > 1:
            raise AmbiguousChange(f"{change_id} is ambiguous: {', '.join(c.change_id for c in matches[:5])}")
        return matches[0]

    def revert(self, change_id: str, force: bool = False) -> RevertResult:
        """Undo a sleep-time change (its id or an unambiguous prefix): the memory is restored as it was before
        (re-embedded, same id), logged as a 'revert' change. Raises ``ChangeNotFound``, ``AmbiguousChange``, or
        ``RevertError`` when the memory changed since (unless ``force``)."""
        log = self._changelog()
        change = self.change(change_id)
        embed = self.pipeline.stages.embed
        done = [c for c in log.for_memory(change.memory_id) if c.reverts == change.change_id]
        if done and not force:
            apply_changes(done, self.pipeline.store, embed)  # idempotent: finishes a revert interrupted before applying
            return RevertResult(change, done[-1], already=True)
        found = self.pipeline.store.get(change.user_id, [change.memory_id])
        rc = build_revert(
            change, found[0] if found else None, datetime.now(UTC), self.settings.pipeline_version, force=force
        )
        log.append([rc])
        apply_changes([rc], self.pipeline.store, embed)
        return RevertResult(change, rc)

    # -- erasure --------------------------------------------------------------------------------
    def erase(self, user_id: str) -> ErasureReport:
        """Erase a user: memories, buffered turns, session counters, change log entries, compaction watermark and
        dead letters."""
        user_id = _require_user(user_id)
        self.pipeline.forget_user(user_id)
        self._counters.forget_user(user_id)
        return erase_user(user_id, store=self.pipeline.store, data_dir=self.settings.data_dir)

    def delete_user(self, user_id: str) -> int:
        """``erase(user_id)``, returning the number of memories removed."""
        return self.erase(user_id).memories

    # -- the rest -------------------------------------------------------------------------------
    def costs(self) -> dict[str, StageCost]:
        return self.pipeline.ledger.totals()

    def info(self) -> MemoryInfo:
        stages = self.pipeline.stages
        store = self.settings.store
        where = store.url or str(store.path)
        return MemoryInfo(stages.compressor.name, stages.extractor.name, where, store.collection)

    def _changelog(self) -> ChangeLog:
        # read fresh each time: compaction runs append through their own ChangeLog
        return ChangeLog.in_dir(self.settings.data_dir)

    def close(self) -> None:
        try:
            self._runner.run(self.pipeline.aclose())
        finally:
            self._runner.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
