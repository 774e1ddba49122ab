"""The serving side of the one store owner: ``Memory`` behind one writer thread, reads on request threads.

``Memory`` is not built for concurrent writers (its pipeline buffers and its event loop), so every write — ingest,
flush, compaction, erasure, revert — runs on ONE writer thread, in the order requests arrived: a flush or an
erasure always sees the turns posted before it. Turns posted without ``wait`` are queued and coalesced into one
``Memory.add_turns`` call per drain, which keeps API ingest as fast as in-process ingest. Searches and other reads
run concurrently on the request threads (the store and the batching query encoder are thread-safe).

The writer is also the idle-flush timer: every ``tick_s`` it calls ``Memory.run_idle`` (the one idle policy), so a
user who stops talking is flushed after ``stm.idle_timeout_s``, as the streaming worker's timer does.

In streaming mode (``kafka``), turns, erasures and compaction requests go to their topics instead; the store is
written by the LTM sink and the compaction agent running in this process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from schemas import RawTurn
from streams.api import IngestReport, Memory
from streams.dlq import dead_letter

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()
COALESCE_TURNS = 256  # queued turns taken into one pass through the pipeline, at most


@dataclass
class _Job:
    turns: list[RawTurn] = field(default_factory=list)
    call: Callable[[], Any] | None = None
    done: Future[Any] | None = None


class Writer:
    """One thread that performs every write on ``Memory``, in submission order."""

    def __init__(self, memory: Memory, *, tick_s: float = 1.0) -> None:
        self.memory = memory
        self.tick_s = tick_s
        self._q: queue.Queue[Any] = queue.Queue()
        self._idle_at = time.monotonic()
        self._count = threading.Lock()
        self.queued_turns = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="memory-writer", daemon=True)
        self._thread.start()

    # -- submission (any thread) ------------------------------------------------------------
    def _queued(self, n: int) -> None:
        with self._count:
            self.queued_turns += n

    def ingest(self, turns: Sequence[RawTurn]) -> None:
        """Queue turns (202): they go through in order; nothing else is returned."""
        self._queued(len(turns))
        self._q.put(_Job(turns=list(turns)))

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the writer after everything queued before it; its result (or exception) in the future."""
        fut: Future[T] = Future()
        self._q.put(_Job(call=fn, done=fut))
        return fut

    def ingest_now(self, turns: Sequence[RawTurn]) -> Future[IngestReport]:
        """Ingest after everything queued before, and return what these turns produced."""
        turns = list(turns)
        self._queued(len(turns))
        return self.call(lambda: self._add(turns))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 600.0) -> None:
        """Finish what is queued, then stop."""
        self._q.put(_STOP)
        self._thread.join(timeout=timeout_s)

    # -- the writer thread --------------------------------------------------------------------
    def _add(self, turns: list[RawTurn]) -> IngestReport:
        try:
            return self.memory.add_turns(turns)
        finally:
            self._queued(-len(turns))

    def _ingest_or_dead_letter(self, turns: list[RawTurn]) -> None:
        try:
            self._add(turns)
            return
        except Exception:  # noqa: BLE001 - accepted turns are never dropped silently
            log.exception("ingest of %d queued turns failed; retrying them one by one", len(turns))
        for t in turns:
            self._queued(1)
            try:
                self._add([t])
            except Exception as exc:  # noqa: BLE001
                self.failures += 1
                dl = dead_letter("ingest", str(exc), type(exc).__name__, t.model_dump_json(), t.user_id)
                self.memory.pipeline.dead_letters.send(dl)
                log.error("dead letter (ingest, %s) for turn %s: %s", type(exc).__name__, t.turn_id, exc)

    def _idle(self) -> None:
        """``Memory.run_idle`` once per tick, also while requests keep the queue busy."""
        if time.monotonic() - self._idle_at < self.tick_s:
            return
        self._idle_at = time.monotonic()
        try:
            self.memory.run_idle()
        except Exception:  # noqa: BLE001 - the buffers stay; the next tick tries again
            log.exception("idle flush failed")

    def _run(self) -> None:
        while True:
            self._idle()
            try:
                job = self._q.get(timeout=self.tick_s)
            except queue.Empty:
                continue
            if job is _STOP:
                return
            if job.call is None:
                # coalesce the queued plain ingests behind this one into one pass through the pipeline
                turns = list(job.turns)
                while True:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        nxt = None
                    if nxt is None or nxt is _STOP or nxt.call is not None:
                        break
                    turns.extend(nxt.turns)
                    if len(turns) >= COALESCE_TURNS:
                        nxt = None
                        break
                self._ingest_or_dead_letter(turns)
                if nxt is _STOP:
                    return
                if nxt is None:
                    continue
                job = nxt
            assert job.done is not None and job.call is not None
            if job.done.set_running_or_notify_cancel():
                try:
                    job.done.set_result(job.call())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    job.done.set_exception(exc)
