"""Scheduling of the sleep-time update, pure: the nightly slot, request ids, who is due.

- ``cron_format``: ``sleep.cron_time`` ``"HH:MM"`` → the daily cron spec;
- ``last_slot``: the most recent scheduled time at or before now, in ``sleep.timezone``;
- ``compaction_request``: a request whose id is a uuid5 of the user and the slot, so a crontab that fires twice
  for one night (two workers, a restart) asks once;
- ``active_users``: the users whose last turn came after a time (only they can have new memories).

Used by the Kafka compaction agent's crontab (``streams.kafka.compaction``) and by embedded schedulers.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from schemas.records import CompactionRequest
from streams import ids
from streams.settings import SleepSettings


def cron_format(sleep: SleepSettings) -> str:
    """``"HH:MM"`` → the daily cron spec ``"MM HH * * *"``."""
    hour, minute = (int(x) for x in sleep.cron_time.split(":"))
    return f"{minute} {hour} * * *"


def last_slot(now: datetime, sleep: SleepSettings) -> datetime:
    """The most recent scheduled nightly time at or before ``now`` (aware, in the configured timezone)."""
    tz = ZoneInfo(sleep.timezone)
    hour, minute = (int(x) for x in sleep.cron_time.split(":"))
    local = now.astimezone(tz)
    slot = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if slot > local:
        slot = (slot - timedelta(days=1)).replace(hour=hour, minute=minute)
    return slot


def compaction_request(user_id: str, slot: str, now: datetime | None = None) -> CompactionRequest:
    return CompactionRequest(
        request_id=ids.derived_id("compaction_request", user_id, slot),
        user_id=user_id,
        watermark=None,
        requested_at=now or datetime.now(UTC),
    )


def active_users(seen_at: Mapping[str, float], since_s: float) -> list[str]:
    """Users whose last turn (epoch seconds) came after ``since_s``."""
    return sorted(u for u, t in seen_at.items() if t > since_s)
