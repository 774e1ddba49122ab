"""Deterministic ids: the same input always yields the same id, so redeliveries and
replays overwrite instead of duplicating."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

NAMESPACE = uuid.UUID("6f1d3c52-3b8e-5a41-9a57-1c0e5b7d2a90")


def _uuid5(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def turn_id(user_id: str, session_id: str, seq: int) -> str:
    return _uuid5("turn", user_id, session_id, str(seq))


def segment_id(user_id: str, turn_ids: Iterable[str]) -> str:
    return _uuid5("segment", user_id, *turn_ids)


def summary_id(user_id: str, turn_ids: Iterable[str]) -> str:
    return _uuid5("summary", user_id, *turn_ids)


def memory_id(user_id: str, source_turn_ids: Iterable[str], position: int, kind: str) -> str:
    """A memory's id: its source turns (sorted) and its position in the extraction output."""
    return _uuid5("memory", user_id, kind, str(position), *sorted(source_turn_ids))


def derived_id(kind: str, *parts: str) -> str:
    """Any other derived id (dead letters, changes, requests)."""
    return _uuid5(kind, *parts)
