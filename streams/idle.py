"""When a user's buffers flush because the user went quiet: one pure policy on stream time.

``decide`` answers from the buffer state and two times in epoch seconds: when the user's last turn arrived
(``last_turn_s``) and "now" (``now_s``). Every runner passes its own notion of now:

- the Kafka worker: wall time of its timer tick, and only for partitions it has caught up on (a user's last
  turn may be old while their next turns still wait in the topic);
- replay: the timestamp of the next record of the user (the gap the worker saw when it ran live);
- the embedded runner: wall time of ``Memory.run_idle``.

The sensory buffer flushes first (its segments go to STM); STM flushes only once the sensory buffer is empty
and the segments it flushed have reached STM (``pending``), so the batch is the same one the embedded runner
would build.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdleDecision:
    flush_sensory: bool
    flush_stm: bool


def idle(last_turn_s: float | None, now_s: float, idle_timeout_s: float) -> bool:
    """True when the user has been quiet for at least the timeout (never when no turn was seen)."""
    return last_turn_s is not None and now_s - last_turn_s >= idle_timeout_s


def decide(
    *,
    last_turn_s: float | None,
    now_s: float,
    idle_timeout_s: float,
    sensory_turns: int,
    stm_segments: int,
    pending: bool = False,
    caught_up: bool = True,
) -> IdleDecision:
    """What to flush now for one user (see the module docstring)."""
    if not caught_up or not idle(last_turn_s, now_s, idle_timeout_s):
        return IdleDecision(False, False)
    return IdleDecision(
        flush_sensory=sensory_turns > 0, flush_stm=sensory_turns == 0 and stm_segments > 0 and not pending
    )
