"""The worker's Faust tables: per-user rows (versioned JSON records of ``schemas.records``) and progress rows.

- ``SensoryRow`` / ``STMRow``: mutable views of ``SensoryTableRow`` / ``STMTableRow`` (a user's buffer state, the
  last source offset applied, and what the re-emission and idle-flush guards need);
- ``UserTable``: a table whose changelog partition is the user's partition (murmur2, as producers);
- progress rows (``progress_key``): the highest source offset handled per partition, stored in that partition of
  the table under a NUL-prefixed key (user ids never start with NUL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faust

from schemas.records import SensoryBufferState, SensoryTableRow, STMBufferState, STMTableRow
from streams import stm

from .topics import partition_for

PROGRESS = b"\x00progress:"  # table keys of per-partition progress rows (user ids never start with NUL)


@dataclass
class SensoryRow:
    """A mutable view of a ``SensoryTableRow`` (the versioned JSON record of the table)."""

    state: SensoryBufferState
    offset: int = -1
    seen_at: float = 0.0
    pending: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, raw: bytes | None, user_id: str) -> SensoryRow:
        if raw is None:
            return cls(SensoryBufferState(user_id=user_id))
        r = SensoryTableRow.model_validate_json(raw)
        return cls(r.state, r.offset, r.seen_at, dict(r.pending))

    def dump(self) -> bytes:
        row = SensoryTableRow(state=self.state, offset=self.offset, seen_at=self.seen_at, pending=self.pending)
        return row.model_dump_json().encode()


@dataclass
class STMRow:
    """A mutable view of an ``STMTableRow``."""

    state: STMBufferState
    offset: int = -1
    recent: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, raw: bytes | None, user_id: str) -> STMRow:
        if raw is None:
            return cls(stm.empty(user_id))
        r = STMTableRow.model_validate_json(raw)
        return cls(r.state, r.offset, list(r.recent))

    def dump(self) -> bytes:
        return STMTableRow(state=self.state, offset=self.offset, recent=self.recent).model_dump_json().encode()

    def knows(self, segment_id: str) -> bool:
        return segment_id in self.recent or any(s.segment_id == segment_id for s in self.state.segments)

    def took(self, marks: dict[str, int]) -> bool:
        """True when STM has taken every turn up to these marks (buffered or batched)."""
        return all(self.state.last_seq.get(session, -1) >= seq for session, seq in marks.items())


class UserTable(faust.Table):
    """A table keyed by user id whose changelog partition is the key's partition (murmur2, as producers).

    That is the user's raw-turn (and segment) partition, known without a current stream event, so the
    idle timer can write rows too. (Faust's own ``use_partitioner=True`` needs the changelog topic in
    the producer's metadata before its first send and crashes otherwise.)
    """

    def partition_for_key(self, key: Any) -> int | None:
        assert self.partitions is not None, "UserTable needs its partition count"
        if key.startswith(PROGRESS):
            return int(key[len(PROGRESS) :])
        return partition_for(key, self.partitions)


def progress_key(partition: int) -> bytes:
    """Row of a partition's progress (highest source offset handled): stored in that changelog partition."""
    return PROGRESS + str(partition).encode()
