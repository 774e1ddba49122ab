"""Relative dates in a query: "two weeks ago", "last Thursday", "in May", "in the past month".

``time_window(query, now)`` reads the first English time expression of a query against the moment it is asked
and returns the span of event times it points at, widened by a tolerance (a person who says "two months ago"
means roughly that), or None when the query names no time. Search uses it to prefer memories of events in that
span (``streams.api.Memory.search(..., as_of=...)``); it never drops the others
(``streams.ranking.prefer``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from streams.text import MONTHS

__all__ = ["TimeWindow", "time_window"]

_NUMBERS = {
    "a": 1,
    "an": 1,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "a couple of": 2,
    "a few": 3,
    "several": 3,
}
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}
_COUNT = r"(\d{1,3}|a couple of|a few|several|an?|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)"
_UNIT = r"(day|week|month|year)s?"

_AGO = re.compile(rf"\b{_COUNT}\s+{_UNIT}\s+ago\b")
_PAST = re.compile(rf"\b(?:in|during|over|within)\s+the\s+(?:past|last)\s+(?:{_COUNT}\s+)?{_UNIT}\b")
_LAST_WEEKDAY = re.compile(rf"\b(?:last|on|this past)\s+({'|'.join(_WEEKDAYS)})\b")
_LAST_UNIT = re.compile(r"\b(?:last|previous)\s+(week(?:end)?|month|year)\b")
_THIS_UNIT = re.compile(r"\bthis\s+(week|month|year)\b")
_DAY_WORD = re.compile(r"\b(yesterday|today)\b")
# "in May", "during December 2023", "of January"; "may" alone is a verb far more often than a month
_IN_MONTH = re.compile(
    rf"\b(?:in|during|of|since)\s+(?:early\s+|late\s+|mid-?\s*)?({'|'.join(MONTHS)})(?:\s+(\d{{4}}))?\b"
)


@dataclass(frozen=True)
class TimeWindow:
    """Event times ``[start, end]`` a query points at, and the words that said so."""

    start: datetime
    end: datetime
    phrase: str

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"time window ends before it starts: {self.start} > {self.end}")


def _count(word: str | None) -> int:
    if word is None:
        return 1
    return int(word) if word.isdigit() else _NUMBERS[word]


def _day_start(ts: datetime) -> datetime:
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


def _month_start(year: int, month: int, like: datetime) -> datetime:
    return _day_start(like).replace(year=year, month=month, day=1)


def _next_month(ts: datetime) -> datetime:
    return ts.replace(year=ts.year + 1, month=1) if ts.month == 12 else ts.replace(month=ts.month + 1)


def _tolerance(days: int) -> timedelta:
    """How loosely "N units ago" is meant: a day for days, a few days for weeks, half a unit beyond that."""
    if days <= 1:
        return timedelta(days=1)
    if days < 7:
        return timedelta(days=2)
    if days < 30:
        return timedelta(days=max(3, days // 4))
    return timedelta(days=max(10, days // 4))


def _window(start: datetime, end: datetime, phrase: str, now: datetime) -> TimeWindow:
    return TimeWindow(start, min(end, now), phrase)


def time_window(query: str, now: datetime) -> TimeWindow | None:
    """The event-time span the first relative time expression of ``query`` names, seen from ``now`` (an aware
    datetime: the moment the question is asked); None when the query names none. Examples, asked on
    Wednesday 2023-05-31: "two weeks ago" → 2023-05-14 ± 3 days; "last Thursday" → 2023-05-25 ± 1 day;
    "in May" → 2023-05-01 .. now; "in December" → 2022-12-01 .. 2022-12-31; "in the past month" → the 30 days
    before now."""
    text = " ".join(query.lower().split())
    candidates: list[tuple[int, TimeWindow]] = []
    if m := _AGO.search(text):
        days = _count(m.group(1)) * _UNIT_DAYS[m.group(2)]
        center = now - timedelta(days=days)
        tol = _tolerance(days)
        candidates.append((m.start(), _window(_day_start(center - tol), center + tol, m.group(0), now)))
    if m := _PAST.search(text):
        days = _count(m.group(1)) * _UNIT_DAYS[m.group(2)]
        candidates.append((m.start(), _window(_day_start(now - timedelta(days=days + 1)), now, m.group(0), now)))
    if m := _LAST_WEEKDAY.search(text):
        back = (now.weekday() - _WEEKDAYS.index(m.group(1))) % 7 or 7
        day = _day_start(now - timedelta(days=back))
        candidates.append((m.start(), _window(day - timedelta(days=1), day + timedelta(days=2), m.group(0), now)))
    if m := _LAST_UNIT.search(text):
        unit = m.group(1)
        if unit == "week":
            start = now - timedelta(days=14)
        elif unit == "weekend":
            start = now - timedelta(days=10)
        elif unit == "month":
            start = now - timedelta(days=62)
        else:
            start = _month_start(now.year - 1, 1, now)
        candidates.append((m.start(), _window(_day_start(start), now, m.group(0), now)))
    if m := _THIS_UNIT.search(text):
        unit = m.group(1)
        if unit == "week":
            start = now - timedelta(days=now.weekday())
        elif unit == "month":
            start = now.replace(day=1)
        else:
            start = now.replace(month=1, day=1)
        candidates.append((m.start(), _window(_day_start(start), now, m.group(0), now)))
    if m := _DAY_WORD.search(text):
        day = _day_start(now) - timedelta(days=1 if m.group(1) == "yesterday" else 0)
        candidates.append((m.start(), _window(day - timedelta(days=1), day + timedelta(days=2), m.group(0), now)))
    if m := _IN_MONTH.search(text):
        month = MONTHS.index(m.group(1)) + 1
        year = int(m.group(2)) if m.group(2) else (now.year if month <= now.month else now.year - 1)
        start = _month_start(year, month, now)
        if start <= now:
            candidates.append((m.start(), _window(start, _next_month(start) - timedelta(seconds=1), m.group(0), now)))
    if not candidates:
        return None
    return min(candidates, key=lambda c: c[0])[1]
