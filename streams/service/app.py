"""The FastAPI application: ``/v1`` over one ``Memory``, with keys, tenants, rate limits and metrics.

``create_app(service)`` builds the app around a :class:`~streams.service.state.Service` (the ``Memory``, its writer
thread and, in streaming mode, the Kafka side). Routes add no memory logic of their own: they check who is asking,
translate the caller's user names into the store's (tenant-scoped) ids and back, and call ``Memory``.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' annotations, and ``Who``/``Admin`` are local
# to ``create_app``, so they must be evaluated where the routes are defined
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas import DeadLetter, MemoryChange
from streams import metrics
from streams.api import AmbiguousChange, ChangeNotFound, RevertError
from streams.ltm import MissingUserError
from streams.service import convert
from streams.service.auth import NO_AUTH, USER_PATTERN, Principal
from streams.service.models import (
    CompactIn,
    CompactOut,
    CostsOut,
    ErasureOut,
    Health,
    InfoOut,
    IngestOut,
    MemoriesPage,
    MemoryDetail,
    Problem,
    Ready,
    RevertOut,
    SearchHit,
    SearchOut,
    TurnsAccepted,
    TurnsIn,
    UsersOut,
)
from streams.service.state import Service

UserQuery = Annotated[str, Query(pattern=USER_PATTERN, description="the user (of your tenant)")]
UserPath = Annotated[str, Path(pattern=USER_PATTERN, description="the user (of your tenant)")]
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
MemoryIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="a memory id (uuid)")]
SourceTurnsQuery = Annotated[
    bool,
    Query(
        description="each record's source turns with their raw text; false leaves them out for a leaner response "
        "(source_turn_ids stay; GET /v1/memories/{memory_id} has the turns)"
    ),
]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "a request body that is not JSON"},
    401: {"model": Problem, "description": "no API key, or an unknown or revoked one"},
    404: {"model": Problem, "description": "no such user or record in your tenant"},
    429: {"model": Problem, "description": "rate limit; retry after the Retry-After header's seconds"},
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 403: {"model": Problem, "description": "needs an admin key"}}


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers)


def _invalid(loc: list[str | int], msg: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape (``detail``: a list of {loc, msg, type}), as the OpenAPI document declares."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="LightMem Streams memory API",
        version="1",
        description="Long-term memory for LLM agents: post conversation turns, search what they left behind.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(Observe)

    @app.exception_handler(MissingUserError)
    async def _missing_user(request: Request, exc: MissingUserError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["query", "user_id"], "msg": str(exc), "type": "missing"}]}, 422)

    # -- who is asking ------------------------------------------------------------------------
    async def principal(request: Request) -> Principal:  # async: no I/O, so no worker-thread hop per request
        header = request.headers.get("authorization", "")
        if service.no_auth:
            who: Principal | None = NO_AUTH
        else:
            scheme, _, key = header.partition(" ")
            if not key or scheme.lower() != "bearer":
                raise _problem(
                    401, "an API key is required: Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"}
                )
            who = service.keys.authenticate(key.strip())
            if who is None:
                raise _problem(401, "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
        assert who is not None
        retry = service.limiter.hit(who.key_id)
        if retry is not None:
            raise _problem(429, f"rate limit {service.settings.api.rate_limit} exceeded", {"Retry-After": str(retry)})
        return who

    Who = Annotated[Principal, Depends(principal)]

    async def admin(who: Who) -> Principal:
        if not who.admin:
            raise _problem(403, "this needs an admin key (lightmem keys create --tenant T --admin)")
        return who

    Admin = Annotated[Principal, Depends(admin)]

    def known(who: Principal, user_id: str) -> str:
        """The store id of an existing user of the caller's tenant; 404 otherwise (another tenant's user included)."""
        internal = who.internal(user_id)
        if not service.users.exists(internal):
            raise _problem(404, f"no user {user_id!r}")
        return internal

    # -- ingest -------------------------------------------------------------------------------
    @app.post(
        "/v1/turns",
        status_code=202,
        response_model=TurnsAccepted,
        responses={**ERRORS, 200: {"model": TurnsAccepted, "description": "wait=true: ingested"}},
        tags=["ingest"],
    )
    async def post_turns(
        who: Who,
        body: TurnsIn,
        response: Response,
        wait: Annotated[bool, Query(description="embedded server: return after the turns went through")] = False,
    ) -> TurnsAccepted:
        """Add turns. All or nothing: a batch with one bad turn is refused with a reason per bad turn (422)."""
        problems = service.check_turns(body.turns)
        if problems:
            raise RequestValidationError(problems)
        turns = service.build_turns(who, body.turns)
        ids = [t.turn_id for t in turns]
        report = await service.ingest(turns, wait=wait)
        if report is None:
            return TurnsAccepted(accepted=len(turns), turn_ids=ids)
        response.status_code = 200
        return TurnsAccepted(accepted=len(turns), turn_ids=ids, report=convert.ingest_out(who, report))

    @app.post(
        "/v1/users/{user_id}/flush",
        response_model=IngestOut,
        responses={**ERRORS, 409: {"model": Problem, "description": "streaming mode: the workers flush idle users"}},
        tags=["ingest"],
    )
    async def flush_user(who: Who, user_id: UserPath) -> IngestOut:
        """Extract what is buffered for the user into long-term memory now (after the turns posted before)."""
        internal = known(who, user_id)
        if service.streaming is not None:
            idle = service.settings.stm.idle_timeout_s
            raise _problem(409, f"streaming mode: the workers hold the buffers and flush a user idle for {idle:g} s")
        return convert.ingest_out(who, await service.flush(internal))

    # -- reads --------------------------------------------------------------------------------
    @app.get("/v1/search", response_model=SearchOut, responses=ERRORS, tags=["read"])
    async def search(
        who: Who,
        q: Annotated[str, Query(min_length=1, max_length=4096, description="the query")],
        user_id: UserQuery,
        limit: Annotated[int, Query(ge=1, le=100)] = 10,
        since: Annotated[datetime | None, Query(description="ISO 8601 with offset")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601 with offset")] = None,
        mode: Literal["hybrid", "dense", "sparse"] | None = None,
        source_turns: SourceTurnsQuery = True,
        as_of: Annotated[
            datetime | None,
            Query(
                description="when the question is asked (ISO 8601 with offset): relative dates in q are read from it"
            ),
        ] = None,
    ) -> SearchOut:
        """The user's ``limit`` best memories for ``q``, optionally only of events between ``since`` and ``until``;
        with ``as_of``, memories of the span a relative date in ``q`` names ("two weeks ago", "in May") rank higher."""
        for name, ts in (("since", since), ("until", until), ("as_of", as_of)):
            if ts is not None and ts.tzinfo is None:
                raise _invalid(["query", name], "needs a UTC offset (e.g. 2024-05-01T10:00:00+00:00)")
        if since is not None and until is not None and since > until:
            raise _invalid(["query", "since"], "since is after until")
        internal = who.internal(user_id)
        if not service.users.known(internal):  # not seen yet: may re-read the store's users (not on the loop)
            internal = await asyncio.to_thread(known, who, user_id)
        # on the event loop, no worker thread: concurrent searches share one encoder pass (streams.service.search)
        hits = await service.searches.search(q, internal, limit, time_from=since, time_to=until, mode=mode, as_of=as_of)
        return SearchOut(
            results=[SearchHit(record=convert.record(who, h.record, source_turns), score=h.score) for h in hits]
        )

    @app.get("/v1/memories", response_model=MemoriesPage, responses=ERRORS, tags=["read"])
    def list_memories(
        who: Who,
        user_id: UserQuery,
        cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")] = None,
        limit: Annotated[int | None, Query(ge=1, le=1000, description="page size")] = None,
        source_turns: SourceTurnsQuery = True,
    ) -> MemoriesPage:
        """The user's memories, oldest first, a page at a time."""
        internal = known(who, user_id)
        try:
            after = convert.decode_cursor(cursor) if cursor else None
        except ValueError as exc:
            raise _invalid(["query", "cursor"], str(exc)) from exc
        page, nxt = convert.page(service.memory.get_all(internal), after, limit or service.settings.api.page_size)
        return MemoriesPage(memories=[convert.record(who, r, source_turns) for r in page], next_cursor=nxt)

    @app.get("/v1/memories/{memory_id}", response_model=MemoryDetail, responses=ERRORS, tags=["read"])
    def get_memory(who: Who, memory_id: MemoryIdPath, user_id: UserQuery) -> MemoryDetail:
        """One memory with its source turns (ids, and the turns with their raw text) and its sleep-time change
        history (also once deleted)."""
        internal = known(who, user_id)
        view = service.memory.get(memory_id.lower(), internal)
        if view is None:
            raise _problem(404, f"no memory {memory_id} for user {user_id!r}")
        return convert.detail(who, view)

    @app.get("/v1/memories/{memory_id}/history", response_model=list[MemoryChange], responses=ERRORS, tags=["read"])
    def memory_history(who: Who, memory_id: MemoryIdPath) -> list[MemoryChange]:
        """Every sleep-time change to one of your tenant's memories, oldest first."""
        return convert.changes(who, service.memory.history(memory_id.lower()))

    # -- changes, erasure, compaction ---------------------------------------------------------
    @app.post(
        "/v1/changes/{change_id}/revert",
        response_model=RevertOut,
        responses={**ERRORS, 409: {"model": Problem, "description": "the memory changed since; force=true"}},
        tags=["write"],
    )
    async def revert_change(
        who: Who,
        change_id: Annotated[str, Path(pattern=UUID_PATTERN, description="the change id (uuid)")],
        force: bool = False,
    ) -> RevertOut:
        """Undo a sleep-time change: the memory as it was before (re-embedded, same id), logged as a revert."""
        try:
            change = service.memory.change(change_id.lower())
        except (ChangeNotFound, AmbiguousChange):
            change = None
        if change is None or who.external(change.user_id) is None:
            raise _problem(404, f"no change {change_id}")
        try:
            result = await service.write(lambda: service.memory.revert(change.change_id, force=force))
        except RevertError as exc:
            raise _problem(409, str(exc)) from exc
        return convert.revert_out(who, result)

    @app.delete("/v1/users/{user_id}", response_model=ErasureOut, responses=ADMIN_ERRORS, tags=["write"])
    async def erase_user(who: Admin, user_id: UserPath, response: Response) -> ErasureOut:
        """Erase everything stored about the user (memories, buffered turns, change log, dead letters)."""
        internal = known(who, user_id)
        out = await service.erase(internal)
        if out.mode == "kafka":
            response.status_code = 202
        return out.model_copy(update={"user_id": user_id})

    @app.post("/v1/compact", response_model=CompactOut, responses=ADMIN_ERRORS, tags=["write"])
    async def compact(who: Admin, response: Response, body: Annotated[CompactIn | None, Body()] = None) -> CompactOut:
        """Run the sleep-time update now for the given users of your tenant (default: all of them)."""
        body = body or CompactIn()
        if body.users is None:
            internal = service.users.of(who)
        else:
            internal = [known(who, u) for u in body.users]
        out = await service.compact(who, internal, full=body.full)
        if out.mode == "kafka":
            response.status_code = 202
        return out

    @app.get("/v1/users", response_model=UsersOut, responses=ERRORS, tags=["read"])
    def list_users(who: Who) -> UsersOut:
        """Your tenant's users (with memories, or turns posted to this server)."""
        return UsersOut(users=sorted(who.external(u) or "" for u in service.users.of(who)))

    @app.get("/v1/dead-letters", response_model=list[DeadLetter], responses=ERRORS, tags=["read"])
    def dead_letters(who: Who) -> list[DeadLetter]:
        """Records of your tenant's users that a stage could not process, with the reason."""
        mine = [d for d in service.memory.dead_letters() if d.key is not None and who.external(d.key) is not None]
        return [convert.dead_letter(who, d) for d in mine]

    @app.get("/v1/info", response_model=InfoOut, responses=ERRORS, tags=["read"])
    def info(who: Who) -> InfoOut:
        """The compressor, extractor and store this server runs with."""
        i = service.memory.info()
        return InfoOut(
            compressor=i.compressor, extractor=i.extractor, store=i.store, collection=i.collection, mode=service.mode
        )

    @app.get("/v1/costs", response_model=CostsOut, responses=ERRORS, tags=["read"])
    def costs(who: Who) -> CostsOut:
        """LLM calls, tokens, seconds and items per stage since this server started (all tenants together)."""
        return CostsOut(stages=service.memory.costs())

    # -- operations ---------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Ready}}, tags=["ops"])
    async def readyz(response: Response) -> Ready:
        ready = await service.ready()
        if ready.status != "ready":
            response.status_code = 503
        return ready

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def prometheus() -> Response:
        body, ctype = metrics.render()
        return Response(content=body, media_type=ctype)

    return app


class Observe:
    """Pure ASGI middleware: each HTTP request's route template, method, status and seconds into the metrics.

    (Starlette's ``BaseHTTPMiddleware`` would run every request through an extra task and memory streams.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            metrics.observe_http(template, scope["method"], status, time.perf_counter() - t0)
