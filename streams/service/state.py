"""What one API process holds: the ``Memory``, the writer thread, keys, limits, known users, and the Kafka side."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from schemas import ControlRecord, RawTurn
from streams import ids
from streams.api import IngestReport, Memory
from streams.service import convert
from streams.service.auth import KeyStore, Principal, keys_path
from streams.service.engine import Writer
from streams.service.models import CompactOut, ErasureOut, Ready, TurnIn
from streams.service.ratelimit import RateLimiter
from streams.service.search import SearchBatcher
from streams.settings import Settings

T = TypeVar("T")


class StreamingSide(Protocol):
    """Streaming mode: the raw-turn producer, the store owner's sink and compaction agent, the broker probe."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def produce(self, turns: Sequence[RawTurn]) -> None: ...

    async def erase(self, user_id: str) -> ControlRecord: ...

    async def compact(self, users: Sequence[str]) -> list[str]: ...

    async def broker_ok(self) -> bool: ...

    def running(self) -> bool: ...


class KnownUsers:
    """Users with memories or accepted turns, to answer 404 for anyone else (another tenant's users included).

    Seeded from the store, kept current by this process's own ingests and erasures, and re-read from the store
    (at most once per ``refresh_s``) when asked about someone unknown — the sink may have written them.
    """

    def __init__(self, list_users: Callable[[], list[str]], refresh_s: float = 1.0) -> None:
        self._list = list_users
        self.refresh_s = refresh_s
        self._users: set[str] = set()
        self._lock = threading.Lock()
        self._read_at = float("-inf")

    def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._read_at < self.refresh_s:
            return
        users = self._list()
        with self._lock:
            self._users |= set(users)
            self._read_at = time.monotonic()

    def add(self, users: Sequence[str]) -> None:
        with self._lock:
            self._users.update(users)

    def discard(self, user: str) -> None:
        with self._lock:
            self._users.discard(user)

    def known(self, user: str) -> bool:
        """Whether ``user`` is known now, without re-reading the store."""
        return user in self._users

    def exists(self, user: str) -> bool:
        if user in self._users:
            return True
        self._refresh()
        return user in self._users

    def of(self, who: Principal) -> list[str]:
        self._refresh(force=True)
        with self._lock:
            return sorted(u for u in self._users if who.external(u) is not None)


class Service:
    """The API's state: built by ``lightmem serve`` (or a test) around an open ``Memory``."""

    def __init__(
        self,
        settings: Settings,
        memory: Memory,
        *,
        no_auth: bool = False,
        streaming: StreamingSide | None = None,
        keys: KeyStore | None = None,
    ) -> None:
        self.settings = settings
        self.memory = memory
        self.no_auth = no_auth
        self.streaming = streaming
        self.keys = keys or KeyStore(keys_path(settings.api.keys_file, settings.data_dir))
        self.limiter = RateLimiter(settings.api.rate_limit)
        self.users = KnownUsers(memory.users)
        self.writer = None if streaming else Writer(memory)
        self.searches = SearchBatcher(memory, settings.api.search_batch_window_ms / 1000)
        self._lock = threading.Lock()  # streaming mode: the API's own store writes (reverts), one at a time

    @property
    def mode(self) -> Literal["embedded", "kafka"]:
        return "kafka" if self.streaming else "embedded"

    async def start(self) -> None:
        self.users.add(await asyncio.to_thread(self.memory.users))
        if self.streaming is not None:
            await self.streaming.start()

    async def stop(self) -> None:
        if self.streaming is not None:
            await self.streaming.stop()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        await asyncio.to_thread(self.searches.close)

    # -- writes ---------------------------------------------------------------------------------
    async def write(self, fn: Callable[[], T]) -> T:
        """Run a store write after everything queued before it (embedded), or under the API's write lock."""
        if self.writer is not None:
            return await asyncio.wrap_future(self.writer.call(fn))

        def locked() -> T:
            with self._lock:
                return fn()

        return await asyncio.to_thread(locked)

    def check_turns(self, turns: Sequence[TurnIn]) -> list[dict[str, Any]]:
        """The limits a turn model cannot state (configurable sizes, duplicates), as 422 items."""
        api = self.settings.api
        problems: list[dict[str, Any]] = []
        if len(turns) > api.max_batch_turns:
            msg = f"at most {api.max_batch_turns} turns per request, got {len(turns)}"
            return [{"loc": ["body", "turns"], "msg": msg, "type": "too_long", "input": len(turns)}]
        seen: dict[tuple[str, str, int], int] = {}
        for i, t in enumerate(turns):
            if len(t.content) > api.max_turn_chars:
                msg = f"content has {len(t.content)} characters; at most {api.max_turn_chars}"
                problems.append({"loc": ["body", "turns", i, "content"], "msg": msg, "type": "too_long"})
            if t.seq is not None:
                key = (t.user_id, t.session_id, t.seq)
                if key in seen:
                    msg = f"duplicate turn (user_id, session_id, seq) of turn {seen[key]}"
                    problems.append({"loc": ["body", "turns", i, "seq"], "msg": msg, "type": "value_error"})
                seen.setdefault(key, i)
        return problems

    def build_turns(self, who: Principal, turns: Sequence[TurnIn]) -> list[RawTurn]:
        """RawTurns under the tenant's user ids; turns without ``seq`` take the next ones of their session."""
        internal = [who.internal(t.user_id) for t in turns]
        need: dict[tuple[str, str], int] = {}
        for u, t in zip(internal, turns, strict=True):
            if t.seq is None:
                need[(u, t.session_id)] = need.get((u, t.session_id), 0) + 1
        nxt = {key: self.memory.next_seq(key[0], key[1], n) for key, n in need.items()}
        out: list[RawTurn] = []
        problems: list[dict[str, Any]] = []
        for i, (u, t) in enumerate(zip(internal, turns, strict=True)):
            seq = t.seq
            if seq is None:
                seq = nxt[(u, t.session_id)]
                nxt[(u, t.session_id)] += 1
            try:
                out.append(
                    RawTurn(
                        turn_id=ids.turn_id(u, t.session_id, seq),
                        user_id=u,
                        session_id=t.session_id,
                        seq=seq,
                        role=t.role,
                        speaker=t.speaker,
                        content=t.content,
                        timestamp=t.timestamp,
                        source_id=t.source_id,
                    )
                )
            except ValidationError as exc:  # the record's own limits (schemas), reported like the request's
                for e in exc.errors():
                    loc = ["body", "turns", i, *e["loc"]]
                    problems.append({"loc": loc, "msg": e["msg"], "type": e["type"]})
        if problems:
            raise RequestValidationError(problems)
        return out

    async def ingest(self, turns: Sequence[RawTurn], *, wait: bool = False) -> IngestReport | None:
        self.users.add([t.user_id for t in turns])
        if self.streaming is not None:
            await self.streaming.produce(turns)
            return None
        assert self.writer is not None
        if wait:
            return await asyncio.wrap_future(self.writer.ingest_now(turns))
        self.writer.ingest(turns)
        return None

    async def flush(self, user_id: str) -> IngestReport:
        """Embedded mode only: in streaming mode the workers hold the buffers (and flush idle users)."""
        return await self.write(lambda: self.memory.flush(user_id))

    async def erase(self, user_id: str) -> ErasureOut:
        if self.streaming is not None:
            record = await self.streaming.erase(user_id)
            self.users.discard(user_id)
            return ErasureOut(user_id=user_id, mode="kafka", requested_at=record.requested_at)
        report = await self.write(lambda: self.memory.erase(user_id))
        self.users.discard(user_id)
        return ErasureOut(
            user_id=user_id,
            mode="embedded",
            memories=report.memories,
            changes=report.changes,
            watermark=report.watermark,
            dead_letters=report.dead_letters,
        )

    async def compact(self, who: Principal, users: Sequence[str], *, full: bool = False) -> CompactOut:
        if not users:
            return CompactOut(mode=self.mode)
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
        return Ready(status="ready" if ok else "not ready", store=store, broker=broker, mode=self.mode)
