"""Applying memory changes to the store, and undoing them — shared by the embedded runner and the Kafka LTM sink.

A change is applied as the state it names, guarded by versions, so applying it twice, late, or after a later
change is harmless (what a redelivery, a resumed run or a replay of the changes topic does):

- ``update`` / ``revert`` with a ``new_record``: the record is RE-EMBEDDED (dense and BM25 vectors from its new
  text) and upserted under the same id — unless the store already holds that version or a later one. An update
  of a memory that is gone is skipped (logged);
- ``delete`` (and a ``revert`` whose ``new_record`` is None): the point is removed — unless the store holds a
  version newer than the one the change deleted (it was restored meanwhile). The change itself keeps the deleted
  record (``old_record``), so the memory's history and a revert survive the point;
- ``ignore``: nothing.

Within one call all changes are folded per memory first (in order), then the writes go out: upserts (one
embedding batch; a record whose text did not change keeps its stored vector) before deletes, so a survivor that
absorbs a deleted memory's provenance is written before the deleted point disappears.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from schemas.records import MemoryChange, MemoryRecord
from streams import ids
from streams.ltm import MemoryStore

log = logging.getLogger(__name__)

Embed = Callable[[Sequence[str]], np.ndarray]
REVERT_MODEL = "operator"


@dataclass
class ApplyReport:
    applied: int = 0
    skipped: int = 0
    upserted: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: ApplyReport) -> None:
        self.applied += other.applied
        self.skipped += other.skipped
        self.upserted.extend(other.upserted)
        self.deleted.extend(other.deleted)
        self.seconds += other.seconds


_KEEP = object()  # "leave the memory as it is"


def next_state(current: MemoryRecord | None, change: MemoryChange) -> MemoryRecord | None | object:
    """The memory after ``change`` given its ``current`` state, or ``_KEEP`` when the change does not apply."""
    if change.action == "ignore":
        return _KEEP
    if change.action == "delete":
        if current is None:
            return _KEEP
        if change.old_version is not None and current.version > change.old_version:
            return _KEEP  # restored or changed after this delete was decided
        return None
    if change.action == "update":
        target = change.new_record
        if target is None:
            log.error("update %s of memory %s carries no new_record: not applied", change.change_id, change.memory_id)
            return _KEEP
        if current is None:
            log.warning("update %s: memory %s is gone; not applied", change.change_id, change.memory_id)
            return _KEEP
        return _KEEP if current.version >= target.version else target
    # revert: go to new_record (None = the memory was absent before the reverted change)
    target = change.new_record
    if target is None:
        if current is None or (change.old_version is not None and current.version > change.old_version):
            return _KEEP
        return None
    return _KEEP if current is not None and current.version >= target.version else target


def apply_changes(changes: Sequence[MemoryChange], store: MemoryStore, embed: Embed) -> ApplyReport:
    """Apply changes in order (see the module docstring); returns what was written.

    A record whose text changed is re-embedded; one whose text did not (a survivor that only took over the
    provenance of a superseded memory) keeps its stored vector, which is what re-embedding would give.
    """
    t0 = time.perf_counter()
    report = ApplyReport()
    by_user: dict[str, list[MemoryChange]] = {}
    for c in changes:
        by_user.setdefault(c.user_id, []).append(c)
    upserts: list[MemoryRecord] = []
    vectors: dict[str, np.ndarray] = {}
    deletes: dict[str, list[str]] = {}
    for user, user_changes in by_user.items():
        wanted = list(dict.fromkeys(c.memory_id for c in user_changes))
        current: dict[str, MemoryRecord | None] = {m: None for m in wanted}
        current.update({r.memory_id: r for r in store.get(user, wanted)})
        state = dict(current)
        for c in user_changes:
            nxt = next_state(state[c.memory_id], c)
            if nxt is _KEEP:
                report.skipped += int(c.action != "ignore")
                continue
            state[c.memory_id] = nxt  # type: ignore[assignment]
            report.applied += 1
        same_text: list[str] = []
        for m, rec in state.items():
            before = current[m]
            if rec is None and before is not None:
                deletes.setdefault(user, []).append(m)
            elif rec is not None and rec != before:
                upserts.append(rec)
                if before is not None and before.text == rec.text:
                    same_text.append(m)
        if same_text:
            vectors.update(store.get_vectors(user, same_text))
    if upserts:
        fresh = [r for r in upserts if r.memory_id not in vectors]
        if fresh:  # re-embedded: vectors follow the new text
            vectors.update(zip([r.memory_id for r in fresh], embed([r.text for r in fresh]), strict=True))
        store.upsert(upserts, np.stack([vectors[r.memory_id] for r in upserts]))
        report.upserted.extend(r.memory_id for r in upserts)
    for user, mids in deletes.items():
        store.delete(user, mids)
        report.deleted.extend(mids)
    report.seconds = time.perf_counter() - t0
    return report


def change_hook(embed: Embed) -> Callable[[Sequence[MemoryChange], MemoryStore], None]:
    """The Kafka LTM sink's ``apply_changes`` hook: ``LTMSink(..., apply_changes=change_hook(embed))``."""

    def hook(changes: Sequence[MemoryChange], store: MemoryStore) -> None:
        report = apply_changes(changes, store, embed)
        log.info(
            "applied %d memory changes (%d skipped as already applied or stale): %d re-embedded, %d deleted",
            report.applied,
            report.skipped,
            len(report.upserted),
            len(report.deleted),
        )

    return hook


# -- revert ----------------------------------------------------------------------------------------------


class RevertError(ValueError):
    """A change cannot be reverted (an 'ignore'), or the memory changed since (without ``force``)."""


def build_revert(
    change: MemoryChange, current: MemoryRecord | None, now: datetime, pipeline_version: str, *, force: bool = False
) -> MemoryChange:
    """The ``revert`` change that undoes ``change``: the memory goes back to ``change.old_record`` (re-embedded,
    same id, version bumped past every version it had), or is removed again when it did not exist before.

    ``current`` is the memory as stored now. If it is not what ``change`` left (a later change touched it),
    a ``RevertError`` is raised unless ``force``.
    """
    if change.action == "ignore":
        raise RevertError(f"change {change.change_id} is an 'ignore': there is nothing to revert")
    left = change.new_record if change.action in ("update", "revert") else None
    if not force:
        if left is None and current is not None:
            raise RevertError(
                f"memory {change.memory_id} exists again (version {current.version}) since change "
                f"{change.change_id}; use --force to revert anyway"
            )
        if left is not None and (current is None or current.version != left.version):
            now_is = "gone" if current is None else f"at version {current.version}"
            raise RevertError(
                f"memory {change.memory_id} is {now_is}, not at version {left.version} that change "
                f"{change.change_id} left; use --force to revert anyway"
            )
    before = change.old_record
    restored: MemoryRecord | None = None
    if before is not None:
        versions = [before.version, current.version if current else 0, left.version if left else 0]
        restored = before.model_copy(update={"version": max(versions) + 1, "updated_at": now})
    if restored is None and current is None:
        raise RevertError(f"memory {change.memory_id} is already absent, as before change {change.change_id}")
    return MemoryChange(
        change_id=ids.derived_id(
            "memory_change", change.memory_id, str(current.version if current else 0), "revert", change.change_id
        ),
        memory_id=change.memory_id,
        user_id=change.user_id,
        action="revert",
        old_text=current.text if current else None,
        new_text=restored.text if restored else None,
        old_version=current.version if current else None,
        new_version=restored.version if restored else None,
        reason=f"revert of {change.action} {change.change_id}",
        caused_by=[],
        reverts=change.change_id,
        model=REVERT_MODEL,
        pipeline_version=pipeline_version,
        at=now,
        old_record=current,
        new_record=restored,
    )
