"""One codec for consumed topic records: ``decode(spec, msg) -> record | DeadLetter``.

A topic's ``TopicSpec`` names the record it carries (``spec.record``) and the in-band records it may also
carry (``spec.also``: the erasure barrier ``ControlRecord`` travels through the raw-turn, segment and summary
topics so it stays ordered with the user's records). The record key must be the record's user id, or on
purgeable topics (``spec.per_record_key``) ``<user>/<record id>``. A message becomes the first model its JSON validates
as, or a dead letter with the stage, the reason (the primary model's validation errors), the origin
(topic[partition]@offset) and the original bytes.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas.records import DeadLetter, Record

from .topics import TopicSpec, message_dead_letter, user_of_record_key, validation_kind, validation_reason


def user_of(record: Record) -> str | None:
    user = getattr(record, "user_id", None)
    return user if isinstance(user, str) else None


def decode(spec: TopicSpec, msg: Any, stage: str) -> Record | DeadLetter:
    """The record a consumed message (aiokafka or Faust) holds, or its dead letter (keyed by the user)."""
    got = _decode(spec, msg, stage)
    if isinstance(got, DeadLetter) and spec.per_record_key:
        return got.model_copy(update={"key": user_of_record_key(msg.key)})
    return got


def _decode(spec: TopicSpec, msg: Any, stage: str) -> Record | DeadLetter:
    if msg.value is None:
        return message_dead_letter(msg, stage, "tombstone (null value) on a record topic", "NullValue")
    raw = msg.value if isinstance(msg.value, bytes) else str(msg.value).encode()
    first: ValidationError | None = None
    record: Record | None = None
    for model in (spec.record, *spec.also):
        try:
            record = model.model_validate_json(raw)
            break
        except ValidationError as exc:
            first = first or exc
    if record is None:
        assert first is not None
        return message_dead_letter(msg, stage, validation_reason(first), validation_kind(first))
    user = user_of(record)
    if spec.per_record_key:
        if user_of_record_key(msg.key) != user:
            reason = f"record key {msg.key!r} does not start with the record's user id {user!r}"
            return message_dead_letter(msg, stage, reason, "KeyMismatch")
    elif user is not None and msg.key != user.encode("utf-8"):
        what = type(record).__name__
        reason = f"record key {msg.key!r} is not the {what}'s user id {user!r}"
        return message_dead_letter(msg, stage, reason, "KeyMismatch")
    return record
