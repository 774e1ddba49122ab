"""Erasure of one user, embedded: everything the service holds about them, everywhere it keeps it.

``erase_user(user_id, store=..., data_dir=...)`` removes

- the user's points from the store;
- their memory changes from the change log (which hold old texts and whole deleted records) and their
  compaction watermark;
- dead letters keyed by the user (they hold original payloads: turns, segments, memories).

``streams.api.Memory.erase`` calls it after dropping the user's buffered sensory/STM state and session counters,
so that afterwards no command finds anything of the user. Kafka mode erases through a ``ControlRecord`` on the
control topic instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from streams.ltm import MemoryStore
from streams.sleep.changelog import ChangeLog, Watermarks

DEAD_LETTERS_FILE = "dead_letters.jsonl"


@dataclass(frozen=True)
class ErasureReport:
    user_id: str
    memories: int
    changes: int
    watermark: bool
    dead_letters: int


def _rewrite(path: Path, text: str) -> None:
    """Replace ``path`` atomically (write a sibling, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        _rewrite(path, "".join(f"{line}\n" for line in keep))
    return removed


def erase_state(data_dir: Path, user_id: str) -> tuple[int, bool, int]:
    """The sleep-time and dead-letter parts of an erasure: (changes removed, watermark dropped, dead letters)."""
    changes = ChangeLog.in_dir(data_dir).forget_user(user_id)
    watermark = Watermarks.in_dir(data_dir).forget(user_id)
    dead = forget_dead_letters(Path(data_dir) / DEAD_LETTERS_FILE, user_id)
    return changes, watermark, dead


def erase_user(user_id: str, *, store: MemoryStore, data_dir: Path) -> ErasureReport:
    """Erase a user's points from ``store`` and their change log entries, watermark and dead letters under
    ``data_dir``."""
    points = store.delete_user(user_id)
    changes, watermark, dead = erase_state(data_dir, user_id)
    return ErasureReport(user_id, points, changes, watermark, dead)
