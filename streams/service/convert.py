"""From ``Memory``'s results to wire models, with the tenant prefix stripped from every user id; cursors."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from schemas import DeadLetter, MemoryChange, MemoryRecord
from streams.api import CompactionReport, IngestReport, MemoryView, RevertResult
from streams.service.auth import Principal
from streams.service.models import CompactOut, IngestOut, MemoryDetail, RevertOut, UserRunOut


def _name(who: Principal, internal: str) -> str:
    name = who.external(internal)
    if name is None:  # the routes only ever read the caller's own ids; this would be a scoping bug
        raise LookupError("a record of another tenant reached a response")
    return name


def record(who: Principal, rec: MemoryRecord, source_turns: bool = True) -> MemoryRecord:
    """The record as the caller sees it; ``source_turns=False`` leaves out the turns' raw text (their ids stay)."""
    update: dict[str, Any] = {}
    if who.tenant is not None:
        update["user_id"] = _name(who, rec.user_id)
    if not source_turns and rec.source_turns:
        update["source_turns"] = []
    return rec.model_copy(update=update) if update else rec


def change(who: Principal, c: MemoryChange) -> MemoryChange:
    if who.tenant is None:
        return c
    update: dict[str, Any] = {"user_id": _name(who, c.user_id)}
    if c.old_record is not None:
        update["old_record"] = record(who, c.old_record)
    if c.new_record is not None:
        update["new_record"] = record(who, c.new_record)
    return c.model_copy(update=update)


def changes(who: Principal, cs: Sequence[MemoryChange]) -> list[MemoryChange]:
    """The caller's tenant's changes only (others are dropped, not revealed)."""
    return [change(who, c) for c in cs if who.external(c.user_id) is not None]


def dead_letter(who: Principal, d: DeadLetter) -> DeadLetter:
    if who.tenant is None or d.key is None:
        return d
    return d.model_copy(update={"key": who.external(d.key) or ""})


def ingest_out(who: Principal, report: IngestReport) -> IngestOut:
    return IngestOut(
        turns=report.turns,
        segments=report.segments,
        extractions=report.extractions,
        memories=[record(who, m) for m in report.memories],
        dead_letters=[dead_letter(who, d) for d in report.dead_letters],
    )


def detail(who: Principal, view: MemoryView) -> MemoryDetail:
    rec = record(who, view.record) if view.record is not None else None
    return MemoryDetail(
        memory_id=view.memory_id,
        user_id=_name(who, view.user_id),
        record=rec,
        source_turn_ids=view.source_turn_ids,
        source_turns=view.source_turns,
        changes=changes(who, view.changes),
        caused=changes(who, view.caused),
    )


def revert_out(who: Principal, result: RevertResult) -> RevertOut:
    return RevertOut(reverted=change(who, result.reverted), revert=change(who, result.revert), already=result.already)


def compact_out(who: Principal, report: CompactionReport) -> CompactOut:
    return CompactOut(
        mode="embedded",
        model=report.model,
        runs=[
            UserRunOut(
                user_id=_name(who, u.user_id),
                watermark_before=u.watermark_before,
                watermark_after=u.watermark_after,
                targets=u.targets,
                candidates=u.candidates,
                changes=changes(who, u.changes),
                dead_letters=[dead_letter(who, d) for d in u.dead_letters],
                cost=u.cost,
            )
            for u in report.users
        ],
        cost=report.cost,
    )


# -- pagination ------------------------------------------------------------------------------------------
def encode_cursor(rec: MemoryRecord) -> str:
    raw = json.dumps([rec.created_at.isoformat(), rec.memory_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, memory_id = json.loads(raw)
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(memory_id, str):
            raise ValueError
    except (ValueError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor: pass next_cursor from the previous page unchanged") from exc
    return at, memory_id


def page(
    records: Sequence[MemoryRecord], after: tuple[datetime, str] | None, size: int
) -> tuple[list[MemoryRecord], str | None]:
    """The ``size`` records after the cursor position, in ``get_all``'s order (created_at, memory_id)."""
    rest = [r for r in records if after is None or (r.created_at, r.memory_id) > after]
    out = rest[:size]
    return out, encode_cursor(out[-1]) if len(rest) > size else None
