"""Short-term memory buffer: token threshold, idle timeout, on-demand flush, redelivery."""

from __future__ import annotations

from datetime import timedelta

import pytest

from streams import stm
from streams.segment import make_segment
from streams.settings import STMSettings
from tests.factories import T0, compressed_turn


def seg(user: str, start: int, words: int):
    return make_segment(user, [compressed_turn(user, start, " ".join(["cat"] * words))], "single")


def test_flushes_once_the_threshold_is_reached():
    settings = STMSettings(threshold_tokens=10)
    state = stm.empty("u")
    batch, state = stm.add(state, seg("u", 0, 4), T0, settings)
    assert batch is None and state.tokens == 4
    batch, state = stm.add(state, seg("u", 1, 5), T0, settings)
    assert batch is None and state.tokens == 9
    batch, state = stm.add(state, seg("u", 2, 1), T0, settings)
    assert batch is not None and [s.tokens for s in batch] == [4, 5, 1]
    assert state.segments == [] and state.tokens == 0


def test_idle_timeout_and_on_demand_flush():
    settings = STMSettings(threshold_tokens=100, idle_timeout_s=60)
    _, state = stm.add(stm.empty("u"), seg("u", 0, 3), T0, settings)
    assert not stm.due(state, T0 + timedelta(seconds=59), settings)
    assert stm.due(state, T0 + timedelta(seconds=60), settings)
    batch, state = stm.flush(state)
    assert batch is not None and len(batch) == 1 and state.segments == []
    assert stm.flush(state) == (None, state)
    assert not stm.due(state, T0 + timedelta(days=1), settings)


def test_redelivered_segment_is_not_buffered_twice():
    settings = STMSettings(threshold_tokens=100)
    s = seg("u", 0, 3)
    _, state = stm.add(stm.empty("u"), s, T0, settings)
    batch, state2 = stm.add(state, s, T0, settings)
    assert batch is None and state2 == state


def test_wrong_user_rejected():
    with pytest.raises(ValueError, match="STM buffer"):
        stm.add(stm.empty("a"), seg("b", 0, 1), T0, STMSettings())


def test_turns_already_taken_never_reach_a_second_batch():
    st = STMSettings(threshold_tokens=6)
    now = T0
    turns = [compressed_turn("u", i, "one two three") for i in range(5)]
    first = make_segment("u", turns[:2], "single")
    batch, state = stm.add(stm.empty("u"), first, now, st)
    assert batch == [first] and state.last_seq == {"s1": 1}
    # the same segment again (redelivered after its batch left): dropped
    assert stm.add(state, first, now, st) == (None, state)
    # a segment cut elsewhere after a restart, overlapping what was taken: only the new turns go on
    overlap = make_segment("u", turns[1:3], "single")
    batch, state2 = stm.add(state, overlap, now, st)
    assert batch is None and [t.seq for s in state2.segments for t in s.turns] == [2]
    assert state2.segments[0].segment_id == make_segment("u", turns[2:3], "single").segment_id
    # flushing keeps the marks
    out, state3 = stm.flush(state2)
    assert out and state3.last_seq == {"s1": 2} and not state3.segments
