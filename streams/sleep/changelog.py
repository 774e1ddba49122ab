"""Embedded mode's memory-change log and per-user compaction watermarks, both under ``settings.data_dir``.

- ``memory_changes.jsonl``: every ``MemoryChange`` (update / delete / ignore / revert), one JSON object a line,
  appended in the order applied — the embedded twin of the ``memory.changes`` topic and the audit log that
  ``lightmem memory history`` and ``lightmem memory revert`` read. A change whose ``change_id`` is already in the
  log is not appended again (ids are deterministic, so a resumed run does not duplicate its changes).
- ``compaction_watermarks.json``: ``{user_id: ISO time}``; a compaction run of a user considers only memories
  updated after its watermark, and moves it only after all of the user's changes are applied.

Erasure (``forget_user``) rewrites the log without the user's lines and drops the watermark; files are replaced
atomically (write to a temporary file, then rename), so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from schemas.records import MemoryChange

log = logging.getLogger(__name__)

CHANGES_FILE = "memory_changes.jsonl"
WATERMARKS_FILE = "compaction_watermarks.json"


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ChangeLog:
    """Append-only JSON-lines log of memory changes, loaded once and indexed by change id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._changes: list[MemoryChange] = []
        self._ids: set[str] = set()
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    change = MemoryChange.model_validate_json(line)
                except ValueError as exc:
                    if n == len(lines):  # torn by a crash while appending: logged before applying, so never applied
                        log.warning("%s: dropping a torn last line (%s)", path, exc)
                        _replace(path, "".join(c.model_dump_json() + "\n" for c in self._changes))
                        break
                    raise ValueError(f"{path}:{n}: not a MemoryChange ({exc})") from exc
                self._remember(change)

    @classmethod
    def in_dir(cls, data_dir: Path) -> ChangeLog:
        return cls(Path(data_dir) / CHANGES_FILE)

    def _remember(self, change: MemoryChange) -> None:
        if change.change_id not in self._ids:
            self._ids.add(change.change_id)
            self._changes.append(change)

    def __contains__(self, change_id: object) -> bool:
        return change_id in self._ids

    def __len__(self) -> int:
        return len(self._changes)

    def append(self, changes: Iterable[MemoryChange]) -> list[MemoryChange]:
        """Append the changes not yet logged (by change id); returns those appended."""
        with self._lock:
            new: list[MemoryChange] = []
            seen: set[str] = set()
            for c in changes:
                if c.change_id not in self._ids and c.change_id not in seen:
                    seen.add(c.change_id)
                    new.append(c)
            if new:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("".join(c.model_dump_json() + "\n" for c in new))
                    f.flush()
                    os.fsync(f.fileno())
                for c in new:
                    self._remember(c)
            return new

    def all(self) -> list[MemoryChange]:
        return list(self._changes)

    def get(self, change_id: str) -> MemoryChange | None:
        return next((c for c in self._changes if c.change_id == change_id), None)

    def find(self, prefix: str) -> list[MemoryChange]:
        """Changes whose id starts with ``prefix`` (the CLI accepts an unambiguous prefix)."""
        return [c for c in self._changes if c.change_id.startswith(prefix)]

    def for_memory(self, memory_id: str) -> list[MemoryChange]:
        """The life of one memory: every change to it, in the order applied."""
        return [c for c in self._changes if c.memory_id == memory_id]

    def caused_by(self, memory_id: str) -> list[MemoryChange]:
        """Changes to other memories that this memory triggered."""
        return [c for c in self._changes if memory_id in c.caused_by and c.memory_id != memory_id]

    def for_user(self, user_id: str) -> list[MemoryChange]:
        return [c for c in self._changes if c.user_id == user_id]

    def forget_user(self, user_id: str) -> int:
        """Remove every change of a user from the log (rewritten atomically); returns how many."""
        with self._lock:
            keep = [c for c in self._changes if c.user_id != user_id]
            removed = len(self._changes) - len(keep)
            if removed or self.path.exists():
                _replace(self.path, "".join(c.model_dump_json() + "\n" for c in keep))
            self._changes = keep
            self._ids = {c.change_id for c in keep}
            return removed


class Watermarks:
    """Per-user compaction state in one small JSON file: ``{user: {"mark": ISO | null, "completed_at": ISO}}``.

    ``mark`` — memories updated after it are new to compaction; ``completed_at`` — wall time at which the user's
    last run had applied all its changes (changes logged after it may be unapplied and are re-applied first).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        raw = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        self._marks: dict[str, tuple[datetime | None, datetime]] = {
            u: (datetime.fromisoformat(v["mark"]) if v.get("mark") else None, datetime.fromisoformat(v["completed_at"]))
            for u, v in raw.items()
        }

    @classmethod
    def in_dir(cls, data_dir: Path) -> Watermarks:
        return cls(Path(data_dir) / WATERMARKS_FILE)

    def get(self, user_id: str) -> datetime | None:
        """The user's watermark; None = never compacted (every memory is new)."""
        entry = self._marks.get(user_id)
        return entry[0] if entry else None

    def completed_at(self, user_id: str) -> datetime | None:
        entry = self._marks.get(user_id)
        return entry[1] if entry else None

    def users(self) -> list[str]:
        return sorted(self._marks)

    def set(self, user_id: str, mark: datetime | None, completed_at: datetime) -> None:
        if (mark is not None and mark.tzinfo is None) or completed_at.tzinfo is None:
            raise ValueError("watermarks must be timezone-aware")
        with self._lock:
            self._marks[user_id] = (mark, completed_at)
            self._save()

    def forget(self, user_id: str) -> bool:
        with self._lock:
            found = self._marks.pop(user_id, None) is not None
            if found:
                self._save()
            return found

    def _save(self) -> None:
        data = {
            u: {"mark": m.isoformat() if m else None, "completed_at": c.isoformat()}
            for u, (m, c) in sorted(self._marks.items())
        }
        _replace(self.path, json.dumps(data, indent=1))


def users_of(changes: Sequence[MemoryChange]) -> list[str]:
    return sorted({c.user_id for c in changes})
