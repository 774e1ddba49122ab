"""Delivery guarantees of the Faust worker: no record skipped across rebalances, none handled twice.

Faust drops the records of a fetch that completes while the consumer generation changes (a rebalance), counts
the skipped offsets as a "gap" it commits past, and still advances its read offset (faust-streaming issues
#216/#217, "gap appears in the processing", and #241, "fix missed events on a rebalance"). ``Delivery`` works
around it for the worker's agents:

- ``in_order``: a delivery past the next expected offset of its partition means records were dropped: the
  partition is sought back and later deliveries wait for the re-fetch; a redelivery of a handled record is
  skipped;
- progress rows (``advance``/``progress``): the highest offset handled per partition, written to the agent's
  table after the record's effects, so a restarted worker knows where it stands;
- ``unstick``: a partition behind its end while its agent sits idle is sought back to the first offset not
  handled;
- ``caught_up``: whether a partition has no backlog (the idle flush waits for it).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import faust
from faust.types import TP

from .tables import UserTable, progress_key

log = logging.getLogger("streams.kafka.app")

RESEEK_S = 10.0  # a gap still there this long after seeking back is sought back again
STALL_S = 3.0  # an agent idle this long while a partition of it is behind its end re-fetches that partition


class Delivery:
    """The delivery-order check, progress rows and re-seeks of one worker app (see the module docstring).

    ``stats`` counts ``redeliveries`` and ``reseeks`` (the worker's ``WorkerStats``).
    """

    def __init__(self, app: faust.App, stats: Any) -> None:
        self.app = app
        self.stats = stats
        self.expected: dict[TP, int] = {}  # next offset per source partition (delivery order check)
        self.sought: dict[TP, tuple[int, float]] = {}  # partitions sought back: (offset, when)
        self.busy: dict[str, int] = defaultdict(int)  # events in progress per source topic
        self.activity: dict[str, float] = defaultdict(time.monotonic)  # last start/end of an event

    @contextmanager
    def handling(self, topic: str, table: UserTable, messages: Sequence[Any]) -> Iterator[None]:
        """Around an agent's handling of ``messages``: busy meanwhile, their progress recorded afterwards."""
        self.busy[topic] += 1
        try:
            yield
        finally:
            self.advance(table, messages)
            self.busy[topic] -= 1
            self.activity[topic] = time.monotonic()

    async def in_order(self, msg: Any, table: UserTable) -> bool:
        """Accept a delivery unless records before it in its partition never arrived.

        Offsets of our topics are contiguous (no compaction, no transactional markers), so a delivery past
        the next expected offset means the consumer dropped records: Faust discards a fetch that completes
        during a rebalance, and counts the skipped offsets as a "gap" it commits past. The partition is then
        sought back to the expected offset and deliveries past it are dropped until the re-fetch arrives (a
        redelivery below the expected offset was handled already and is skipped); the seek is repeated every
        ``RESEEK_S`` while the gap stays. A gap is accepted only when the broker says those offsets are gone
        (the partition's log start offset moved past them: retention), never because time passed: a busy
        worker whose re-fetch is slow must not skip records.
        """
        tp = TP(msg.topic, msg.partition)
        expected = self.expected.get(tp)
        if expected is None:
            expected = self.progress(table, msg.partition) + 1
        if msg.offset < expected:
            # handled already: an agent handles one record at a time and records the partition's progress
            # after the record's effects (rows, outputs), so everything below it is done
            self.stats.redeliveries += 1
            return False
        if msg.offset == expected:
            self.sought.pop(tp, None)
            self.expected[tp] = expected + 1
            return True
        now = time.monotonic()
        sought = self.sought.get(tp)
        if sought is not None and sought[0] == expected and now - sought[1] < RESEEK_S:
            return False  # the re-fetch from the expected offset is on its way
        start = await self.log_start(tp)
        if start is not None and start > expected:
            log.warning(
                "partition %s[%d]: offsets %d..%d were deleted by retention (log start %d); going on",
                tp.topic,
                tp.partition,
                expected,
                min(start, msg.offset) - 1,
                start,
            )
            self.sought.pop(tp, None)
            if msg.offset <= start:
                self.expected[tp] = msg.offset + 1
                return True
            self.expected[tp] = start
            expected = start
        log.warning(
            "partition %s[%d]: offset %d delivered while %d was expected (the consumer dropped records); seeking back",
            tp.topic,
            tp.partition,
            msg.offset,
            expected,
        )
        self.stats.reseeks += 1
        self.sought[tp] = (expected, now)
        await self.app.consumer.seek(tp, expected)
        return False

    async def log_start(self, tp: TP) -> int | None:
        try:
            got = await self.app.consumer.earliest_offsets(tp)
        except Exception:  # noqa: BLE001 - unknown now: keep waiting for the re-fetch, never skip
            log.warning("cannot read the log start offset of %s[%d]", tp.topic, tp.partition, exc_info=True)
            return None
        return got.get(tp)

    async def on_assigned(self, *args: Any, **kwargs: Any) -> None:
        self.expected.clear()
        self.sought.clear()

    def advance(self, table: UserTable, messages: Sequence[Any]) -> None:
        """Record the highest offset handled per partition (valid, skipped or dead-lettered alike)."""
        top: dict[int, int] = {}
        for m in messages:
            top[m.partition] = max(top.get(m.partition, -1), m.offset)
        for part, offset in top.items():
            if offset > self.progress(table, part):
                table[progress_key(part)] = str(offset).encode()

    @staticmethod
    def progress(table: UserTable, partition: int) -> int:
        raw = table.get(progress_key(partition))
        return -1 if raw is None else int(raw)

    def caught_up(self, table: UserTable, topic: str, partition: int) -> bool:
        """True when this worker has handled every record of the partition it has fetched the end of.

        An idle timeout only means "the user is idle" when their partition has no backlog: after a restart
        or a rebalance, a user's last turn may be old while their next turns still wait in the topic.
        """
        hw = self.hw(topic, partition)
        if hw is None:
            return False  # nothing fetched yet
        return self.progress(table, partition) >= hw - 1

    async def unstick(self, tables: dict[str, UserTable], now: float) -> None:
        """Re-fetch a partition whose fetched records never reached the agent.

        Faust drops the records of a fetch that completes while the consumer generation changes (a
        rebalance) without seeking back, and still advances its read offset, so the partition sits
        behind its end until the next rebalance. When an agent has been idle for ``STALL_S`` while one of
        its partitions is behind its end offset, that partition is sought back to the first offset the
        agent has not handled; the offset watermarks of the tables make a re-delivery harmless.
        """
        stalled = []
        for tp in self.app.assignor.assigned_actives():
            if tp.topic not in tables or self.busy[tp.topic] or now - self.activity[tp.topic] < STALL_S:
                continue
            hw = self.hw(tp.topic, tp.partition)
            done = self.progress(tables[tp.topic], tp.partition)
            if hw is not None and done < hw - 1:
                stalled.append((tp, done, hw))
        for tp, done, hw in stalled:
            log.warning(
                "partition %s[%d] stalled: handled up to offset %d of %d, agent idle for %.0f s; seeking back",
                tp.topic,
                tp.partition,
                done,
                hw - 1,
                now - self.activity[tp.topic],
            )
            self.stats.reseeks += 1
            self.expected.pop(tp, None)
            await self.app.consumer.seek(tp, done + 1)
        for tp, _, _ in stalled:
            self.activity[tp.topic] = now

    def hw(self, topic: str, partition: int) -> int | None:
        try:
            return self.app.consumer.highwater(TP(topic, partition))
        except (AssertionError, KeyError):
            return None
