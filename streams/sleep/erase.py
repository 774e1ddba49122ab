"""Erasure of one user, embedded: everything the service holds about them, everywhere it keeps it.

``erase_user(memory, user_id)`` removes

- the user's points from the store, their buffered sensory/STM state and session counters (``Memory.delete_user``);
- their memory changes from the change log (which hold old texts and whole deleted records) and their
  compaction watermark;
- dead letters keyed by the user (they hold original payloads: turns, segments, memories);

so that afterwards no command finds anything of the user. Kafka mode erases through a ``ControlRecord`` on the
control topic instead (see ``streams.sleep`` for the state of that wiring).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streams.sleep.changelog import ChangeLog, Watermarks, _replace

if TYPE_CHECKING:
    from streams.api import Memory

DEAD_LETTERS_FILE = "dead_letters.jsonl"


@dataclass(frozen=True)
class ErasureReport:
    user_id: str
    memories: int
    changes: int
    watermark: bool
    dead_letters: int


def forget_dead_letters(path: Path, user_id: str) -> int:
    """Rewrite a JSON-lines dead-letter log without the records keyed by ``user_id``; returns how many."""
    if not path.exists():
        return 0
    keep: list[str] = []
    removed = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            key = json.loads(line).get("key")
        except (json.JSONDecodeError, AttributeError):
            key = None
        if key == user_id:
            removed += 1
        elif line.strip():
            keep.append(line)
    if removed:
        _replace(path, "".join(f"{line}\n" for line in keep))
    return removed


def erase_state(data_dir: Path, user_id: str) -> tuple[int, bool, int]:
    """The sleep-time and dead-letter parts of an erasure: (changes removed, watermark dropped, dead letters)."""
    changes = ChangeLog.in_dir(data_dir).forget_user(user_id)
    watermark = Watermarks.in_dir(data_dir).forget(user_id)
    dead = forget_dead_letters(Path(data_dir) / DEAD_LETTERS_FILE, user_id)
    return changes, watermark, dead


def erase_user(memory: Memory, user_id: str) -> ErasureReport:
    """Erase a user from an embedded ``Memory`` and its data directory."""
    points = memory.delete_user(user_id)
    changes, watermark, dead = erase_state(memory.settings.data_dir, user_id)
    return ErasureReport(user_id, points, changes, watermark, dead)
