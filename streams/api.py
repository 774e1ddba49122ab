"""The Python API, shaped like what mem0 users know.

from streams.api import Memory
m = Memory()                                  # Settings() from LIGHTMEM_* env, embedded mode
m.add([{"role": "user", "content": "I adopted a cat named Miso"}], user_id="alice", session_id="s1")
m.flush(user_id="alice")
for hit in m.search("what pet does alice have?", user_id="alice"):
    print(hit.score, hit.record.text, hit.record.source_turn_ids)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from schemas import MemoryRecord, RawTurn, StageCost
from streams import ids
from streams.ltm import MissingUserError, ScoredMemory
from streams.pipeline import EmbeddedPipeline, IngestReport, Stages
from streams.settings import Settings


def _require_user(user_id: str | None) -> str:
    if not user_id or not str(user_id).strip():
        raise MissingUserError("a user_id is required: every memory read and write is scoped to one user")
    return str(user_id)


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

    # -- read -----------------------------------------------------------------------------
    def search(
        self,
        query: str,
        user_id: str,
        limit: int = 10,
        *,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        mode: str | None = None,
    ) -> list[ScoredMemory]:
        user_id = _require_user(user_id)
        vector = None if mode == "sparse" else self.pipeline.stages.encoder.embed_one(query)
        return self.pipeline.store.search(
            user_id,
            query,
            vector,
            limit,
            mode=mode,
            time_from=time_from,
            time_to=time_to,  # type: ignore[arg-type]
        )

    def get_all(self, user_id: str, limit: int | None = None) -> list[MemoryRecord]:
        return self.pipeline.store.get_all(_require_user(user_id), limit)

    def delete_user(self, user_id: str) -> int:
        """Remove every memory and buffered turn of a user."""
        user_id = _require_user(user_id)
        self.pipeline.sensory.pop(user_id, None)
        self.pipeline.stm.pop(user_id, None)
        self._counters.forget_user(user_id)
        return self.pipeline.store.delete_user(user_id)

    def costs(self) -> dict[str, StageCost]:
        return self.pipeline.ledger.totals()

    def close(self) -> None:
        try:
            self._runner.run(self.pipeline.aclose())
        finally:
            self._runner.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
