"""Concurrent searches served together: one encoder pass for their queries, then each search, on one thread.

One query costs a few milliseconds of CPU in the encoder, and the embedded store (Qdrant's edge engine) holds
Python's GIL while it searches, so a search on a thread of its own only adds GIL hand-offs between the request
threads, the event loop and the encoder. :class:`SearchBatcher` takes the searches of all concurrent requests:
those arriving within ``window_s`` of each other (or while the previous batch runs) share ONE batched forward
pass of the query encoder, and their store searches follow on the same thread. The event loop awaits the result
without a worker thread per request.

Results are those of :meth:`streams.api.Memory.search` one query at a time: the searches go through it, with
the query's vector from the batched pass (padding in a batch moves only the last digits of a vector).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from streams import metrics
from streams.api import Memory, SearchMode
from streams.ltm import ScoredMemory
from streams.service.batcher import MicroBatcher


@dataclass(frozen=True)
class SearchRequest:
    query: str
    user_id: str
    limit: int = 10
    time_from: datetime | None = None
    time_to: datetime | None = None
    mode: SearchMode | None = None
    as_of: datetime | None = None
    done: Future[list[ScoredMemory]] = field(default_factory=Future, compare=False)


class SearchBatcher(MicroBatcher[SearchRequest]):
    """``await search(...)`` from the event loop (or ``submit`` from any thread); one thread serves them all."""

    def __init__(self, memory: Memory, window_s: float = 0.002, max_batch: int = 64) -> None:
        self.memory = memory
        super().__init__("search batcher", "search-batcher", window_s, max_batch)

    def submit(self, request: SearchRequest) -> Future[list[ScoredMemory]]:
        self.put(request)
        return request.done

    async def search(
        self,
        query: str,
        user_id: str,
        limit: int = 10,
        *,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        mode: SearchMode | None = None,
        as_of: datetime | None = None,
    ) -> list[ScoredMemory]:
        """``Memory.search`` with the same arguments, batched with the searches running meanwhile."""
        request = SearchRequest(query, user_id, limit, time_from, time_to, mode, as_of)
        return await asyncio.wrap_future(self.submit(request))

    # -- the batcher thread --------------------------------------------------------------------
    def _vectors(self, batch: list[SearchRequest]) -> list[np.ndarray | None]:
        """The query vectors of the batch's dense and hybrid searches, from one encoder pass (None: sparse)."""
        dense = [i for i, r in enumerate(batch) if r.mode != "sparse"]
        out: list[np.ndarray | None] = [None] * len(batch)
        if dense:
            metrics.SEARCH_BATCH.observe(len(dense))
            vecs = self.memory.pipeline.stages.encoder.embed([batch[i].query for i in dense])
            for i, v in zip(dense, vecs, strict=True):
                out[i] = np.asarray(v, dtype=np.float32)
        return out

    def _serve(self, taken: list[SearchRequest]) -> None:
        batch = [r for r in taken if r.done.set_running_or_notify_cancel()]  # cancelled ones are dropped
        try:
            vectors = self._vectors(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for r in batch:
                r.done.set_exception(exc)
            return
        for r, vec in zip(batch, vectors, strict=True):
            try:
                hits = self.memory.search(
                    r.query,
                    r.user_id,
                    r.limit,
                    time_from=r.time_from,
                    time_to=r.time_to,
                    mode=r.mode,
                    query_vector=vec,
                    as_of=r.as_of,
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                r.done.set_exception(exc)
            else:
                r.done.set_result(hits)
