"""What goes over the wire: the request bodies, and responses built from the pydantic records in ``schemas``.

Every ``user_id`` a client sees is its own (the tenant prefix is stripped on the way out, see ``auth``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas import DeadLetter, MemoryChange, MemoryRecord, SourceTurn, StageCost
from streams.service.auth import USER_PATTERN

UserName = Field(pattern=USER_PATTERN, description="letters, digits and . _ @ - (no ':'), at most 128")


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TurnIn(Wire):
    """One turn, as in the JSON-lines ingest format."""

    user_id: str = UserName
    session_id: str = Field(min_length=1, max_length=256)
    role: str = Field(min_length=1, max_length=64, description="user, assistant, a speaker's name, tool, ...")
    content: str = Field(description="the turn's text (at most LIGHTMEM_API__MAX_TURN_CHARS characters)")
    timestamp: AwareDatetime = Field(description="event time, ISO 8601 with an offset")
    seq: int | None = Field(default=None, ge=0, le=2**31, description="default: next in its session")
    speaker: str | None = Field(default=None, max_length=256)
    source_id: str | None = Field(default=None, max_length=256)


class TurnsIn(Wire):
    turns: list[TurnIn] = Field(min_length=1, description="at most LIGHTMEM_API__MAX_BATCH_TURNS turns")


class IngestOut(Wire):
    """What an ingest or flush produced (``IngestReport``)."""

    turns: int = 0
    segments: int = 0
    extractions: int = 0
    memories: list[MemoryRecord] = Field(default_factory=list)
    dead_letters: list[DeadLetter] = Field(default_factory=list)


class TurnsAccepted(Wire):
    """202: the turns are queued for the pipeline (or produced to the raw-turn topic), in order, under these ids.
    200 (``?wait=true`` on an embedded server): they went through, and ``report`` says what they produced."""

    accepted: int
    turn_ids: list[str]
    report: IngestOut | None = None


class SearchHit(Wire):
    record: MemoryRecord
    score: float


class SearchOut(Wire):
    results: list[SearchHit]


class MemoriesPage(Wire):
    memories: list[MemoryRecord]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= for the next page; null at the end")


class MemoryDetail(Wire):
    """A memory as it is now (``record`` is null once deleted), the turns it was made from (ids, and the turns with
    their raw text), and its change history. A deleted memory's sources are those it had before the delete."""

    memory_id: str
    user_id: str
    record: MemoryRecord | None
    source_turn_ids: list[str]
    source_turns: list[SourceTurn] = Field(
        description="the source turns with their text (empty for memories stored before memories kept them)"
    )
    changes: list[MemoryChange]
    caused: list[MemoryChange] = Field(description="changes to other memories this one caused")


class RevertOut(Wire):
    reverted: MemoryChange
    revert: MemoryChange
    already: bool


class ErasureOut(Wire):
    """Embedded: what was erased (200). Streaming: the erasure was put on the control topic (202)."""

    user_id: str
    mode: Literal["embedded", "kafka"]
    memories: int | None = None
    changes: int | None = None
    watermark: bool | None = None
    dead_letters: int | None = None
    requested_at: AwareDatetime | None = None


class CompactIn(Wire):
    users: list[Annotated[str, Field(pattern=USER_PATTERN)]] | None = Field(
        default=None, max_length=1000, description="default: every user of the tenant"
    )
    full: bool = Field(default=False, description="ignore the watermarks: compare every memory again")


class UserRunOut(Wire):
    """One user's compaction run."""

    user_id: str
    watermark_before: AwareDatetime | None
    watermark_after: AwareDatetime | None
    targets: int
    candidates: int
    changes: list[MemoryChange]
    dead_letters: list[DeadLetter]
    cost: StageCost


class CompactOut(Wire):
    """Embedded: each user's run and the total cost (200). Streaming: ``requested`` users' requests are on the
    compaction topic; the agent in this process runs them (202)."""

    mode: Literal["embedded", "kafka"]
    model: str = Field(default="", description="who decided: 'llm:<model>' or 'offline-rule'")
    runs: list[UserRunOut] = Field(default_factory=list)
    cost: StageCost | None = None
    requested: list[str] = Field(default_factory=list)


class UsersOut(Wire):
    users: list[str]


class InfoOut(Wire):
    """What the server's ``Memory`` runs with (names only)."""

    compressor: str
    extractor: str
    store: str
    collection: str
    mode: Literal["embedded", "kafka"]


class CostsOut(Wire):
    stages: dict[str, StageCost]


class Health(Wire):
    status: Literal["ok"]


class Ready(Wire):
    status: Literal["ready", "not ready"]
    store: bool
    broker: bool | None = Field(default=None, description="streaming mode: the broker answers")
    mode: Literal["embedded", "kafka"]


class Problem(Wire):
    detail: str
