"""Per-session high-water marks of turn sequence numbers: how the stages recognise a redelivered turn.

A turn is identified by (user, session, seq) (its ``turn_id`` is a uuid5 of them), and turns of one session
reach a stage in ``seq`` order (one Kafka partition per user; an idempotent producer keeps a producer's
order). So "seq at or below the session's mark" means "already taken": a producer retry, a client re-sending a
conversation, a record redelivered after a crash. The marks of the ``MAX_SESSIONS`` most recently active
sessions are kept (a bounded table row); a session older than that is not guarded any more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from schemas.records import CompressedTurn

MAX_SESSIONS = 1024


def taken(marks: Mapping[str, int], turn: CompressedTurn) -> bool:
    """True when the turn is at or below its session's mark (a redelivery)."""
    return turn.seq <= marks.get(turn.session_id, -1)


def advance(marks: Mapping[str, int], turns: Iterable[CompressedTurn]) -> dict[str, int]:
    """The marks after taking ``turns`` (the session moves to the most recent end; the oldest are evicted)."""
    out = dict(marks)
    for t in turns:
        seq = max(out.pop(t.session_id, -1), t.seq)
        out[t.session_id] = seq
    while len(out) > MAX_SESSIONS:
        del out[next(iter(out))]
    return out
