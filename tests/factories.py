"""Builders for test records (real schema objects, deterministic ids)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas import CompressedTurn, MemoryRecord, RawTurn
from streams import ids

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def raw_turn(
    user: str, session: str, seq: int, content: str, role: str = "user", speaker: str | None = None
) -> RawTurn:
    return RawTurn(
        turn_id=ids.turn_id(user, session, seq),
        user_id=user,
        session_id=session,
        seq=seq,
        role=role,
        speaker=speaker,
        content=content,
        timestamp=T0 + timedelta(minutes=seq),
    )


def compressed_turn(
    user: str,
    seq: int,
    text: str,
    *,
    session: str = "s1",
    role: str = "user",
    speaker: str | None = None,
    at: datetime | None = None,
    encoder_tokens: int | None = None,
) -> CompressedTurn:
    words = len(text.split())
    return CompressedTurn(
        turn_id=ids.turn_id(user, session, seq),
        user_id=user,
        session_id=session,
        seq=seq,
        role=role,
        speaker=speaker,
        timestamp=at or T0 + timedelta(minutes=seq),
        raw_text=text,
        compressed_text=text,
        compressor="identity",
        rate=1.0,
        raw_tokens=words,
        compressed_tokens=words,
        encoder_tokens=words if encoder_tokens is None else encoder_tokens,
    )


def memory_record(
    *, memory_id: str = "m1", user_id: str = "u1", text: str = "a fact", when: datetime = T0, turn: str = "t1"
) -> MemoryRecord:
    """A fact memory of one turn at ``when``."""
    return MemoryRecord(
        memory_id=memory_id,
        user_id=user_id,
        session_ids=["s1"],
        text=text,
        kind="fact",
        source_turn_ids=[turn],
        event_timestamps=[when],
        topic_id="topic-1",
        summary_id="summary-1",
        pipeline_version="test",
        created_at=when,
        updated_at=when,
    )
