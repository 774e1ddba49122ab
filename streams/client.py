"""Python client of the memory service, with ``Memory``'s method names and return types.

Agent code switches between embedded and service in one line::

    from streams.client import MemoryClient
    m = MemoryClient("http://127.0.0.1:8420", api_key="lm_…")   # instead of Memory()
    m.add("I adopted a cat named Miso", user_id="alice"); m.flush("alice"); m.search("pets?", user_id="alice")

``AsyncMemoryClient`` is the same over ``httpx.AsyncClient``. Each call is described once (:class:`_Call`: the
request, and how to read its response); the two clients differ only in how they send it.

Errors: 401 :class:`AuthError`, 403 :class:`ForbiddenError`, 404 :class:`NotFoundError` (a ``LookupError``; ``get``
returns None instead), 409 ``RevertError`` (from ``revert``; :class:`ConflictError` otherwise, e.g. ``flush`` on a
streaming server, whose workers flush idle users), 422 :class:`InvalidRequestError` (a ``ValueError``), 429
:class:`RateLimitedError` with ``retry_after_s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import httpx

from schemas import DeadLetter, MemoryChange, MemoryRecord, RawTurn, StageCost
from streams.api import (
    CompactionReport,
    ErasureReport,
    IngestReport,
    MemoryInfo,
    MemoryView,
    RevertError,
    RevertResult,
)
from streams.ltm import MissingUserError, ScoredMemory
from streams.service.models import (
    CompactOut,
    CostsOut,
    ErasureOut,
    InfoOut,
    IngestOut,
    MemoriesPage,
    MemoryDetail,
    RevertOut,
    SearchOut,
    TurnsAccepted,
    UsersOut,
)
from streams.sleep.compact import UserRun

T = TypeVar("T")


class ServiceError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class AuthError(ServiceError):
    """401: no key, or an unknown or revoked one."""


class ForbiddenError(ServiceError):
    """403: needs an admin key."""


class NotFoundError(ServiceError, LookupError):
    """404: no such user, memory or change in this key's tenant."""


class ConflictError(ServiceError):
    """409: not possible in the server's state (a flush in streaming mode)."""


class InvalidRequestError(ServiceError, ValueError):
    """422: the request was refused; ``detail`` says why (per turn for ``add``)."""


class RateLimitedError(ServiceError):
    """429: retry after ``retry_after_s`` seconds."""

    def __init__(self, status: int, detail: str, retry_after_s: float) -> None:
        super().__init__(status, detail)
        self.retry_after_s = retry_after_s


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return str(detail)


def _raise_for(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = _detail(response)
    if status == 401:
        raise AuthError(status, detail)
    if status == 403:
        raise ForbiddenError(status, detail)
    if status == 404:
        raise NotFoundError(status, detail)
    if status == 409:
        if "/revert" in str(response.request.url.path):
            raise RevertError(detail)
        raise ConflictError(status, detail)
    if status == 422:
        raise InvalidRequestError(status, detail)
    if status == 429:
        raise RateLimitedError(status, detail, float(response.headers.get("retry-after", "1")))
    raise ServiceError(status, detail)


@dataclass
class _Call(Generic[T]):
    """One request and how to read its response."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    missing: Callable[[], T] | None = None  # what a 404 means, when it is not an error

    def result(self, response: httpx.Response) -> T:
        if response.status_code == 404 and self.missing is not None:
            return self.missing()
        _raise_for(response)
        return self.read(response)


def _require_user(user_id: str | None) -> str:
    if not user_id or not str(user_id).strip():
        raise MissingUserError("a user_id is required: every memory read and write is scoped to one user")
    return str(user_id)


def _iso(ts: datetime | None, name: str) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return ts.isoformat()


def _report(out: IngestOut | None, n: int) -> IngestReport:
    if out is None:  # queued (streaming): the memories appear when the stream has processed the turns
        return IngestReport(turns=n)
    return IngestReport(
        turns=out.turns,
        segments=out.segments,
        extractions=out.extractions,
        memories=list(out.memories),
        dead_letters=list(out.dead_letters),
    )


def _turns_call(turns: list[dict[str, Any]]) -> _Call[IngestReport]:
    def read(r: httpx.Response) -> IngestReport:
        acc = TurnsAccepted.model_validate_json(r.content)
        return _report(acc.report, acc.accepted)

    return _Call("POST", "/v1/turns", read, params={"wait": "true"}, json={"turns": turns})


def _view(d: MemoryDetail) -> MemoryView:
    return MemoryView(d.memory_id, d.user_id, d.record, list(d.changes), list(d.caused))


class _Calls:
    """The requests behind each ``Memory`` method (shared by the sync and async clients)."""

    @staticmethod
    def add(
        messages: str | Sequence[Mapping[str, Any]],
        user_id: str,
        session_id: str = "default",
        timestamp: datetime | None = None,
    ) -> _Call[IngestReport]:
        user_id = _require_user(user_id)
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        base = timestamp or datetime.now(UTC)
        if base.tzinfo is None:
            raise ValueError("timestamp must be timezone-aware")
        turns = []
        for i, m in enumerate(msgs):
            if "content" not in m or "role" not in m:
                raise ValueError(f"message {i} needs 'role' and 'content'")
            ts = m.get("timestamp") or base + timedelta(milliseconds=i)
            turn = {
                "user_id": user_id,
                "session_id": session_id,
                "role": str(m["role"]),
                "content": str(m["content"]),
                "timestamp": ts.isoformat() if isinstance(ts, datetime) else str(ts),
            }
            if m.get("name") is not None:
                turn["speaker"] = m["name"]
            turns.append(turn)
        return _turns_call(turns)

    @staticmethod
    def add_turns(turns: Sequence[RawTurn]) -> _Call[IngestReport]:
        fields = ("user_id", "session_id", "seq", "role", "speaker", "content", "timestamp", "source_id")
        body = [
            {k: v for k, v in t.model_dump(mode="json", include=set(fields)).items() if v is not None} for t in turns
        ]
        return _turns_call(body)

    @staticmethod
    def flush(user_id: str | None) -> _Call[IngestReport]:
        user_id = _require_user(user_id)  # the service flushes one user at a time
        return _Call(
            "POST", f"/v1/users/{user_id}/flush", lambda r: _report(IngestOut.model_validate_json(r.content), 0)
        )

    @staticmethod
    def search(
        query: str,
        user_id: str,
        limit: int = 10,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        mode: str | None = None,
        as_of: datetime | None = None,
    ) -> _Call[list[ScoredMemory]]:
        params = {"q": query, "user_id": _require_user(user_id), "limit": limit}
        for k, v in (
            ("since", _iso(time_from, "time_from")),
            ("until", _iso(time_to, "time_to")),
            ("mode", mode),
            ("as_of", _iso(as_of, "as_of")),
        ):
            if v is not None:
                params[k] = v

        def read(r: httpx.Response) -> list[ScoredMemory]:
            return [ScoredMemory(h.record, h.score) for h in SearchOut.model_validate_json(r.content).results]

        return _Call("GET", "/v1/search", read, params=params)

    @staticmethod
    def page(user_id: str, cursor: str | None) -> _Call[MemoriesPage]:
        params: dict[str, Any] = {"user_id": _require_user(user_id)}
        if cursor:
            params["cursor"] = cursor
        return _Call("GET", "/v1/memories", lambda r: MemoriesPage.model_validate_json(r.content), params=params)

    @staticmethod
    def get(memory_id: str, user_id: str) -> _Call[MemoryView | None]:
        return _Call(
            "GET",
            f"/v1/memories/{memory_id}",
            lambda r: _view(MemoryDetail.model_validate_json(r.content)),
            params={"user_id": _require_user(user_id)},
            missing=lambda: None,
        )

    @staticmethod
    def history(memory_id: str) -> _Call[list[MemoryChange]]:
        def read(r: httpx.Response) -> list[MemoryChange]:
            return [MemoryChange.model_validate(c) for c in r.json()]

        return _Call("GET", f"/v1/memories/{memory_id}/history", read)

    @staticmethod
    def revert(change_id: str, force: bool) -> _Call[RevertResult]:
        def read(r: httpx.Response) -> RevertResult:
            out = RevertOut.model_validate_json(r.content)
            return RevertResult(out.reverted, out.revert, out.already)

        return _Call("POST", f"/v1/changes/{change_id}/revert", read, params={"force": str(force).lower()})

    @staticmethod
    def compact(users: Sequence[str] | None, full: bool) -> _Call[CompactionReport]:
        def read(r: httpx.Response) -> CompactionReport:
            out = CompactOut.model_validate_json(r.content)
            runs = [
                UserRun(
                    user_id=u.user_id,
                    watermark_before=u.watermark_before,
                    watermark_after=u.watermark_after,
                    targets=u.targets,
                    candidates=u.candidates,
                    changes=list(u.changes),
                    dead_letters=list(u.dead_letters),
                    cost=u.cost,
                )
                for u in out.runs
            ]
            if out.cost is None:
                return CompactionReport(users=runs, model=out.model)
            return CompactionReport(users=runs, model=out.model, cost=out.cost)

        body = {"users": list(users) if users is not None else None, "full": full}
        return _Call("POST", "/v1/compact", read, json=body)

    @staticmethod
    def erase(user_id: str) -> _Call[ErasureReport]:
        def read(r: httpx.Response) -> ErasureReport:
            out = ErasureOut.model_validate_json(r.content)
            # streaming: the erasure is on the control topic and runs asynchronously; there are no counts yet
            return ErasureReport(
                user_id=out.user_id,
                memories=out.memories or 0,
                changes=out.changes or 0,
                watermark=bool(out.watermark),
                dead_letters=out.dead_letters or 0,
            )

        return _Call("DELETE", f"/v1/users/{_require_user(user_id)}", read)

    @staticmethod
    def users() -> _Call[list[str]]:
        return _Call("GET", "/v1/users", lambda r: list(UsersOut.model_validate_json(r.content).users))

    @staticmethod
    def dead_letters() -> _Call[list[DeadLetter]]:
        return _Call("GET", "/v1/dead-letters", lambda r: [DeadLetter.model_validate(d) for d in r.json()])

    @staticmethod
    def info() -> _Call[MemoryInfo]:
        def read(r: httpx.Response) -> MemoryInfo:
            i = InfoOut.model_validate_json(r.content)
            return MemoryInfo(i.compressor, i.extractor, i.store, i.collection)

        return _Call("GET", "/v1/info", read)

    @staticmethod
    def costs() -> _Call[dict[str, StageCost]]:
        return _Call("GET", "/v1/costs", lambda r: dict(CostsOut.model_validate_json(r.content).stages))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class MemoryClient:
    """``Memory`` over HTTP (sync). ``url``: the server's base URL; ``api_key``: a key from ``lightmem keys``."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = 120.0) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=_headers(api_key), timeout=timeout_s)

    def _send(self, call: _Call[T]) -> T:
        r = self._http.request(call.method, call.path, params=call.params, json=call.json)
        return call.result(r)

    def add(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        user_id: str,
        session_id: str = "default",
        timestamp: datetime | None = None,
    ) -> IngestReport:
        return self._send(_Calls.add(messages, user_id, session_id, timestamp))

    def add_turns(self, turns: Sequence[RawTurn]) -> IngestReport:
        return self._send(_Calls.add_turns(turns))

    def flush(self, user_id: str | None = None) -> IngestReport:
        """One user's buffers into long-term memory now; without a user, every user of the key's tenant."""
        if user_id is not None:
            return self._send(_Calls.flush(user_id))
        report = IngestReport()
        for u in self.users():
            report.merge(self._send(_Calls.flush(u)))
        return report

    def search(
        self,
        query: str,
        user_id: str,
        limit: int = 10,
        *,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        mode: str | None = None,
        as_of: datetime | None = None,
    ) -> list[ScoredMemory]:
        return self._send(_Calls.search(query, user_id, limit, time_from, time_to, mode, as_of))

    def get_all(self, user_id: str, limit: int | None = None) -> list[MemoryRecord]:
        return _take(self._pages(user_id), limit)

    def _pages(self, user_id: str) -> Iterator[list[MemoryRecord]]:
        cursor: str | None = None
        while True:
            page = self._send(_Calls.page(user_id, cursor))
            yield list(page.memories)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def get(self, memory_id: str, user_id: str) -> MemoryView | None:
        return self._send(_Calls.get(memory_id, user_id))

    def history(self, memory_id: str) -> list[MemoryChange]:
        return self._send(_Calls.history(memory_id))

    def revert(self, change_id: str, force: bool = False) -> RevertResult:
        return self._send(_Calls.revert(change_id, force))

    def compact(
        self,
        users: Sequence[str] | None = None,
        *,
        full: bool = False,
        after_user: Callable[[UserRun], None] | None = None,
    ) -> CompactionReport:
        report = self._send(_Calls.compact(users, full))
        if after_user is not None:
            for run in report.users:
                after_user(run)
        return report

    def erase(self, user_id: str) -> ErasureReport:
        return self._send(_Calls.erase(user_id))

    def delete_user(self, user_id: str) -> int:
        return self.erase(user_id).memories

    def costs(self) -> dict[str, StageCost]:
        return self._send(_Calls.costs())

    def users(self) -> list[str]:
        return self._send(_Calls.users())

    def dead_letters(self) -> list[DeadLetter]:
        return self._send(_Calls.dead_letters())

    def info(self) -> MemoryInfo:
        return self._send(_Calls.info())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMemoryClient:
    """``Memory`` over HTTP for asyncio agents: the same methods, awaited."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = 120.0) -> None:
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=_headers(api_key), timeout=timeout_s)

    async def _send(self, call: _Call[T]) -> T:
        r = await self._http.request(call.method, call.path, params=call.params, json=call.json)
        return call.result(r)

    async def add(
        self,
        messages: str | Sequence[Mapping[str, Any]],
        user_id: str,
        session_id: str = "default",
        timestamp: datetime | None = None,
    ) -> IngestReport:
        return await self._send(_Calls.add(messages, user_id, session_id, timestamp))

    async def add_turns(self, turns: Sequence[RawTurn]) -> IngestReport:
        return await self._send(_Calls.add_turns(turns))

    async def flush(self, user_id: str | None = None) -> IngestReport:
        if user_id is not None:
            return await self._send(_Calls.flush(user_id))
        report = IngestReport()
        for u in await self.users():
            report.merge(await self._send(_Calls.flush(u)))
        return report

    async def search(
        self,
        query: str,
        user_id: str,
        limit: int = 10,
        *,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        mode: str | None = None,
        as_of: datetime | None = None,
    ) -> list[ScoredMemory]:
        return await self._send(_Calls.search(query, user_id, limit, time_from, time_to, mode, as_of))

    async def get_all(self, user_id: str, limit: int | None = None) -> list[MemoryRecord]:
        out: list[MemoryRecord] = []
        cursor: str | None = None
        while limit is None or len(out) < limit:
            page = await self._send(_Calls.page(user_id, cursor))
            out.extend(page.memories)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return out if limit is None else out[:limit]

    async def get(self, memory_id: str, user_id: str) -> MemoryView | None:
        return await self._send(_Calls.get(memory_id, user_id))

    async def history(self, memory_id: str) -> list[MemoryChange]:
        return await self._send(_Calls.history(memory_id))

    async def revert(self, change_id: str, force: bool = False) -> RevertResult:
        return await self._send(_Calls.revert(change_id, force))

    async def compact(
        self,
        users: Sequence[str] | None = None,
        *,
        full: bool = False,
        after_user: Callable[[UserRun], None] | None = None,
    ) -> CompactionReport:
        report = await self._send(_Calls.compact(users, full))
        if after_user is not None:
            for run in report.users:
                after_user(run)
        return report

    async def erase(self, user_id: str) -> ErasureReport:
        return await self._send(_Calls.erase(user_id))

    async def delete_user(self, user_id: str) -> int:
        return (await self.erase(user_id)).memories

    async def costs(self) -> dict[str, StageCost]:
        return await self._send(_Calls.costs())

    async def users(self) -> list[str]:
        return await self._send(_Calls.users())

    async def dead_letters(self) -> list[DeadLetter]:
        return await self._send(_Calls.dead_letters())

    async def info(self) -> MemoryInfo:
        return await self._send(_Calls.info())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _take(pages: Iterator[list[MemoryRecord]], limit: int | None) -> list[MemoryRecord]:
    out: list[MemoryRecord] = []
    for page in pages:
        out.extend(page)
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out
