"""Helpers of the fault suite: inputs, the clean embedded reference, and the comparison of memory-id sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.records import Fact, RawTurn, STMSummary
from streams import ids
from streams.kafka.topics import partition_for


def sessions_of(turns: Sequence[RawTurn], n: int) -> list[RawTurn]:
    order: list[str] = []
    for t in turns:
        if t.session_id not in order:
            order.append(t.session_id)
    keep = set(order[:n])
    return [t for t in turns if t.session_id in keep]


def rekey(turns: Sequence[RawTurn], user: str) -> list[RawTurn]:
    """The same turns as another user's (ids recomputed)."""
    return [t.model_copy(update={"user_id": user, "turn_id": ids.turn_id(user, t.session_id, t.seq)}) for t in turns]


def summary(user: str, n: int, at: datetime | None = None) -> STMSummary:
    """A one-fact summary of turn ``n`` of the user's session s1, created at ``at`` (default 2024-01-01)."""
    turns = [ids.turn_id(user, "s1", n)]
    at = at or datetime(2024, 1, 1, tzinfo=UTC)
    return STMSummary(
        summary_id=ids.summary_id(user, turns),
        user_id=user,
        session_ids=["s1"],
        topic_id=f"seg-{n}",
        segment_ids=[f"seg-{n}"],
        turn_ids=turns,
        summary=f"{user} talked about thing {n}",
        facts=[Fact(text=f"{user} likes thing {n}", source_turn_ids=turns, source_timestamps=[at], session_ids=["s1"])],
        extractor="extractive",
        created_at=at,
    )


def users_on_distinct_partitions(n: int, partitions: int, prefix: str = "user") -> list[str]:
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < min(n, partitions):
        u = f"{prefix}-{i}"
        chosen.setdefault(partition_for(u.encode(), partitions), u)
        i += 1
    out = list(chosen.values())
    while len(out) < n:
        out.append(f"{prefix}-{i}")
        i += 1
    return out


def conversation(conversations: Any, suffix: str) -> list[RawTurn]:
    return next(c for c in conversations if c.user_id.endswith(suffix)).turns


def corpus(conversations: Any, users: Sequence[str], sessions: int) -> list[RawTurn]:
    """Each user gets the first ``sessions`` sessions of a different LoCoMo conversation."""
    srcs = [c.user_id for c in conversations]
    out: list[RawTurn] = []
    for i, u in enumerate(users):
        src = srcs[i % len(srcs)]
        out.extend(rekey(sessions_of(conversation(conversations, src), sessions), u))
    return out


@dataclass
class Comparison:
    expected: int
    found: int
    missing: int
    extra: int
    duplicated: int
    foreign: int

    @property
    def exact(self) -> bool:
        return self.missing == 0 and self.extra == 0 and self.duplicated == 0 and self.foreign == 0

    def row(self) -> str:
        return (
            f"expected={self.expected} found={self.found} missing={self.missing} extra={self.extra} "
            f"duplicated={self.duplicated} foreign={self.foreign}"
        )


def compare(expected: dict[str, Any], found: dict[str, Any], duplicated: int = 0, foreign: int = 0) -> Comparison:
    return Comparison(
        expected=len(expected),
        found=len(found),
        missing=len(set(expected) - set(found)),
        extra=len(set(found) - set(expected)),
        duplicated=duplicated,
        foreign=foreign,
    )
