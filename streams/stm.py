"""Short-term memory: a per-user buffer of topic segments, flushed as ONE batch for ONE extraction call.

It flushes when the buffered segments reach ``threshold_tokens`` (cl100k tokens of the compressed
text), when the user has been idle for ``idle_timeout_s`` (checked by the caller's timer with
``due``), or on demand (``flush``). Pure functions over ``STMBufferState``.
"""

from __future__ import annotations

from datetime import datetime

from schemas import STMBufferState, TopicSegment
from streams import seqmarks
from streams.segment import make_segment
from streams.settings import STMSettings


def empty(user_id: str, last_seq: dict[str, int] | None = None) -> STMBufferState:
    return STMBufferState(user_id=user_id, last_seq=last_seq or {})


def fresh_part(state: STMBufferState, segment: TopicSegment) -> TopicSegment | None:
    """The segment without the turns STM already took (None when it holds none that are new).

    A segment rebuilt from new turns only gets the id of those turns: after a worker restart the sensory stage
    may cut its buffer elsewhere than before the crash, and a turn must still reach one batch only.
    """
    new = [t for t in segment.turns if not seqmarks.taken(state.last_seq, t)]
    if len(new) == len(segment.turns):
        return segment
    return make_segment(segment.user_id, new, segment.boundary) if new else None


def add(
    state: STMBufferState, segment: TopicSegment, now: datetime, settings: STMSettings
) -> tuple[list[TopicSegment] | None, STMBufferState]:
    """Buffer a segment; return the batch to extract when the token threshold is reached."""
    if segment.user_id != state.user_id:
        raise ValueError(f"segment of user {segment.user_id!r} added to the STM buffer of {state.user_id!r}")
    if any(s.segment_id == segment.segment_id for s in state.segments):
        return None, state  # redelivery: already buffered
    part = fresh_part(state, segment)
    if part is None:
        return None, state  # every turn of it was taken already (a redelivery)
    marks = seqmarks.advance(state.last_seq, part.turns)
    segments = [*state.segments, part]
    tokens = state.tokens + part.tokens
    if tokens >= settings.threshold_tokens:
        return segments, empty(state.user_id, marks)
    return None, STMBufferState(
        user_id=state.user_id, segments=segments, tokens=tokens, last_event_at=now, last_seq=marks
    )


def due(state: STMBufferState, now: datetime, settings: STMSettings) -> bool:
    """True when the buffer holds segments and the user has been idle past the timeout."""
    if not state.segments or state.last_event_at is None:
        return False
    return (now - state.last_event_at).total_seconds() >= settings.idle_timeout_s


def flush(state: STMBufferState) -> tuple[list[TopicSegment] | None, STMBufferState]:
    """Hand over whatever is buffered (on demand or on idle timeout)."""
    if not state.segments:
        return None, state
    return list(state.segments), empty(state.user_id, state.last_seq)
