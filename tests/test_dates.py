"""Relative dates in queries (``streams.dates``) and how search prefers memories of the named span."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.dates import TimeWindow, time_window
from streams.ltm import ScoredMemory
from streams.ranking import prefer
from tests.factories import memory_record

# Wednesday
NOW = datetime(2023, 5, 31, 14, 30, tzinfo=UTC)
EARLIEST, LATEST = datetime(2000, 1, 1), datetime(2090, 1, 1)  # noqa: DTZ001 - hypothesis bounds are naive


def day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("query", "inside", "outside"),
    [
        ("Which book did I finish two weeks ago?", ["2023-05-17", "2023-05-14"], ["2023-05-03", "2023-05-30"]),
        ("What kitchen appliance did I buy 10 days ago?", ["2023-05-21", "2023-05-19"], ["2023-05-10", "2023-05-28"]),
        ("Where did I go last Thursday?", ["2023-05-25"], ["2023-05-18", "2023-05-30"]),
        ("How many museums did I visit in December?", ["2022-12-01", "2022-12-31T20:00"], ["2023-01-02", "2022-11-30"]),
        ("What did I plan in May?", ["2023-05-02", "2023-05-31T10:00"], ["2023-04-29", "2022-05-15"]),
        ("What did I cook in March 2021?", ["2021-03-15"], ["2023-03-15"]),
        ("How many events did I attend in the past month?", ["2023-05-02", "2023-05-30"], ["2023-04-20"]),
        ("Jewelry bought in the last two months?", ["2023-04-05"], ["2023-03-20"]),
        ("What did I eat yesterday?", ["2023-05-30T12:00"], ["2023-05-27"]),
        ("Where was the service last week?", ["2023-05-20"], ["2023-05-10"]),
        ("I mentioned a museum a month ago.", ["2023-05-01"], ["2023-03-15", "2023-05-30"]),
    ],
)
def test_time_window_of_relative_phrases(query: str, inside: list[str], outside: list[str]) -> None:
    w = time_window(query, NOW)
    assert w is not None, query
    for ts in inside:
        assert w.start <= day(ts) <= w.end, (query, ts, w)
    for ts in outside:
        assert not w.start <= day(ts) <= w.end, (query, ts, w)


@pytest.mark.parametrize(
    "query",
    [
        "What is the name of my hamster?",
        "May I ask what my favourite colour is?",  # "may" the verb, not the month
        "How many days passed between the mass and the service?",
        "What is the order of the events I watched?",
        "",
    ],
)
def test_no_time_named_no_window(query: str) -> None:
    assert time_window(query, NOW) is None


def test_a_month_not_yet_come_this_year_means_last_year() -> None:
    w = time_window("what did I do in August?", NOW)
    assert w is not None and (w.start, w.end.date()) == (day("2022-08-01"), day("2022-08-31").date())


def test_the_first_phrase_counts() -> None:
    w = time_window("a week ago I said something about what happened in January", NOW)
    assert w is not None and w.phrase == "a week ago"


@given(
    now=st.datetimes(min_value=EARLIEST, max_value=LATEST, timezones=st.just(UTC)),
    n=st.integers(min_value=1, max_value=400),
    unit=st.sampled_from(["day", "week", "month", "year"]),
)
def test_windows_never_reach_past_now_and_hold_their_centre(now: datetime, n: int, unit: str) -> None:
    w = time_window(f"what happened {n} {unit}s ago", now)
    assert w is not None and w.start <= w.end <= now
    centre = now - timedelta(days=n * {"day": 1, "week": 7, "month": 30, "year": 365}[unit])
    assert w.start <= centre


def test_a_window_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(ValueError, match="ends before"):
        TimeWindow(NOW, NOW - timedelta(days=1), "x")


def _hits(*names: str) -> list[ScoredMemory]:
    return [ScoredMemory(memory_record(memory_id=n, text=n), 1.0) for n in names]


def test_prefer_lifts_what_the_span_holds_and_drops_nothing_of_the_top() -> None:
    plain = _hits("a", "b", "c", "d", "e")
    near = _hits("d", "x")
    fused = [h.record.memory_id for h in prefer(plain, [near], 5)]
    assert fused[:2] == ["d", "a"]  # in both lists: first; then plain's first
    assert set(fused) == {"d", "a", "x", "b", "c"}
    assert [h.record.memory_id for h in prefer(plain, [[]], 5)] == ["a", "b", "c", "d", "e"]
    assert [h.record.memory_id for h in prefer(plain, [], 5)] == ["a", "b", "c", "d", "e"]
    scores = [h.score for h in prefer(plain, [near], 5)]
    assert scores == sorted(scores, reverse=True)


def test_prefer_adds_up_every_preferred_ranking() -> None:
    plain = _hits("a", "b", "c", "d")
    window, own = _hits("c", "d"), _hits("d", "b")
    fused = [h.record.memory_id for h in prefer(plain, [window, own], 4)]
    assert fused[0] == "d"  # in all three rankings
    assert set(fused) == {"a", "b", "c", "d"}


@pytest.mark.slow
def test_search_as_of_ranks_the_named_span_first(tmp_path, encoder) -> None:  # noqa: ANN001
    """Two memories of one kind of event; the question's date and "two weeks ago" pick the one told then."""
    from streams.api import Memory
    from streams.settings import Settings, STMSettings
    from streams.stages import Stages

    settings = Settings(data_dir=tmp_path / "state", stm=STMSettings(threshold_tokens=64))
    told = {"s-old": NOW - timedelta(days=120), "s-then": NOW - timedelta(days=14)}
    with Memory(settings, stages=Stages(settings, encoder=encoder)) as m:
        texts = {"s-old": "I went to a concert with my sister.", "s-then": "I went to a gig with my sister."}
        for session, when in told.items():
            m.add(texts[session], user_id="ada", session_id=session, timestamp=when)
            m.flush("ada")
        plain = m.search("Who did I go to the concert with two weeks ago?", user_id="ada", limit=2)
        dated = m.search("Who did I go to the concert with two weeks ago?", user_id="ada", limit=2, as_of=NOW)
        q = "Who did I go to the concert with?"
        same = (m.search(q, user_id="ada", limit=2), m.search(q, user_id="ada", limit=2, as_of=NOW))
    assert len(plain) == len(dated) == 2
    assert plain[0].record.session_ids == ["s-old"]  # "concert" is closer to the question without its date
    assert dated[0].record.session_ids == ["s-then"]
    assert {h.record.memory_id for h in dated} == {h.record.memory_id for h in plain}  # preferred, not filtered
    assert same[0] == same[1]  # no time named: as_of changes nothing
