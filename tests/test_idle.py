"""The idle-flush policy (streams.idle.decide) is a pure function of the buffers and two times."""

from __future__ import annotations

from streams.idle import IdleDecision, decide


def test_idle_flush_order_and_guards() -> None:
    kw = {"idle_timeout_s": 10.0}
    assert decide(last_turn_s=100, now_s=105, sensory_turns=3, stm_segments=2, **kw) == IdleDecision(False, False)
    assert decide(last_turn_s=100, now_s=110, sensory_turns=3, stm_segments=2, **kw) == IdleDecision(True, False)
    assert decide(last_turn_s=100, now_s=110, sensory_turns=0, stm_segments=2, **kw) == IdleDecision(False, True)
    assert decide(last_turn_s=100, now_s=110, sensory_turns=0, stm_segments=2, pending=True, **kw).flush_stm is False
    assert decide(last_turn_s=100, now_s=999, sensory_turns=3, stm_segments=2, caught_up=False, **kw) == IdleDecision(
        False, False
    )
    assert decide(last_turn_s=None, now_s=999, sensory_turns=3, stm_segments=0, **kw) == IdleDecision(False, False)
    assert decide(last_turn_s=100, now_s=110, sensory_turns=0, stm_segments=0, **kw) == IdleDecision(False, False)
