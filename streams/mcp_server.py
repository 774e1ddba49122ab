"""MCP tools over memory (``lightmem mcp``), with the official ``mcp`` SDK, on stdio.

Four tools — ``add_memory``, ``search_memory``, ``list_memories``, ``forget_user`` — over a ``MemoryClient`` when
``LIGHTMEM_API__URL`` names a running server (the usual case: the server owns the store), or over an embedded
``Memory`` otherwise. Both have the same methods, so each tool is written once. Calls run one at a time on a worker
thread: ``Memory`` is synchronous and runs its own event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import anyio
from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

from schemas import MemoryRecord
from streams.api import ErasureReport, IngestReport
from streams.client import ConflictError
from streams.ltm import ScoredMemory

T = TypeVar("T")


class MemoryLike(Protocol):
    """What the tools need: ``streams.api.Memory`` and ``streams.client.MemoryClient`` both are this."""

    def add(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        user_id: str,
        session_id: str = ...,
        timestamp: datetime | None = ...,
    ) -> IngestReport: ...

    def flush(self, user_id: str | None = ...) -> IngestReport: ...

    def search(self, query: str, user_id: str, limit: int = ...) -> list[ScoredMemory]: ...

    def get_all(self, user_id: str, limit: int | None = ...) -> list[MemoryRecord]: ...

    def erase(self, user_id: str) -> ErasureReport: ...


class MemoryItem(BaseModel):
    memory_id: str
    text: str
    kind: str
    event_times: list[datetime]
    score: float | None = None


class Added(BaseModel):
    turns: int
    memories: list[MemoryItem]
    dead_letters: list[str]


class Forgotten(BaseModel):
    user_id: str
    memories: int


def _item(rec: MemoryRecord, score: float | None = None) -> MemoryItem:
    return MemoryItem(
        memory_id=rec.memory_id, text=rec.text, kind=rec.kind, event_times=list(rec.event_timestamps), score=score
    )


def build_server(memory: MemoryLike) -> MCPServer:
    """The MCP server with the four memory tools over ``memory``."""
    server = MCPServer(
        "lightmem",
        instructions=(
            "Long-term memory for conversations. add_memory stores what a user said; search_memory finds what is "
            "relevant to a question; list_memories shows everything kept about a user; forget_user erases a user."
        ),
    )
    lock = threading.Lock()

    async def call(fn: Callable[[], T]) -> T:
        def run() -> T:
            with lock:
                return fn()

        return await anyio.to_thread.run_sync(run)

    @server.tool()
    async def add_memory(
        content: str, user_id: str, session_id: str = "default", role: str = "user", flush: bool = True
    ) -> Added:
        """Remember one conversation turn of a user. With flush (the default) it is turned into long-term memories
        now and they are returned; without, it waits in the short-term buffer for more turns of its topic."""

        def run() -> IngestReport:
            report = memory.add([{"role": role, "content": content}], user_id=user_id, session_id=session_id)
            if flush:
                try:
                    report.merge(memory.flush(user_id))
                except ConflictError:  # a streaming server: its workers flush the user once idle
                    pass
            return report

        report = await call(run)
        return Added(
            turns=report.turns,
            memories=[_item(m) for m in report.memories],
            dead_letters=[f"{d.stage}: {d.reason}" for d in report.dead_letters],
        )

    @server.tool()
    async def search_memory(query: str, user_id: str, limit: int = 5) -> list[MemoryItem]:
        """The user's memories most relevant to the query, best first (hybrid dense + keyword search)."""
        hits = await call(lambda: memory.search(query, user_id, limit))
        return [_item(h.record, h.score) for h in hits]

    @server.tool()
    async def list_memories(user_id: str, limit: int = 50) -> list[MemoryItem]:
        """Everything kept about a user, oldest first (at most ``limit``)."""
        records = await call(lambda: memory.get_all(user_id, limit))
        return [_item(r) for r in records]

    @server.tool()
    async def forget_user(user_id: str) -> Forgotten:
        """Erase everything stored about a user. This cannot be undone."""
        report = await call(lambda: memory.erase(user_id))
        return Forgotten(user_id=user_id, memories=report.memories)

    return server
