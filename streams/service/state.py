"""What one API process holds: the ``Memory``, the writer thread, keys, limits, known users, and the Kafka side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from schemas import ControlRecord, RawTurn
from streams.service import convert
from streams.service.auth import Principal
from streams.service.models import CompactOut, Ready

T = TypeVar("T")


class StreamingSide(Protocol):
    """Streaming mode: the raw-turn producer, the store owner's sink and compaction agent, the broker probe."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def produce(self, turns: Sequence[RawTurn]) -> None: ...

    async def erase(self, user_id: str) -> ControlRecord: ...

    async def compact(self, who: Principal, users: Sequence[str], *, full: bool = False) -> CompactOut:
        if not users:
            return CompactOut(mode="kafka" if self.streaming else "embedded")
        if self.streaming is not None:
            requested = await self.streaming.compact(users)
            return CompactOut(mode="kafka", requested=[who.external(u) or "" for u in requested])
        report = await self.write(lambda: self.memory.compact(list(users), full=full))
        return convert.compact_out(who, report)

    # -- health ---------------------------------------------------------------------------------
    async def ready(self) -> Ready:
        store = self.writer.alive() if self.writer is not None else True
        broker = None
        if self.streaming is not None:
            broker = await self.streaming.broker_ok()
            store = store and self.streaming.running()
        ok = store and broker is not False
        return Ready(status="ready" if ok else "not ready", store=store, broker=broker, mode=self.mode)  # type: ignore[arg-type]
