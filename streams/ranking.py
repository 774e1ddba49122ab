"""Preferring some memories of a query without dropping any: the plain ranking fused with rankings over the
memories a query points at (events of a named time span, ``streams.dates``; the asker's own turns,
``streams.asker``), by reciprocal-rank fusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

import numpy as np

from streams.ltm import MemoryStore, ScoredMemory
from streams.ltm.base import SearchMode

__all__ = ["RRF_K", "prefer", "search_preferring"]

RRF_K = 60  # reciprocal-rank constant: the customary 60 (5 to 60 measured on the dev split, see README)


def prefer(
    plain: Sequence[ScoredMemory], preferred: Sequence[Sequence[ScoredMemory]], limit: int
) -> list[ScoredMemory]:
    """The best ``limit`` of ``plain`` (over all of a query's memories) fused with each ranking of ``preferred``
    (over a subset). A memory in more rankings rises; one in only one keeps its place against the others'. Scores
    become the fused scores; equal scores keep ``plain``'s order, then the preferred rankings' in turn."""
    fused: dict[str, float] = {}
    seen: dict[str, ScoredMemory] = {}
    for ranking in (plain, *preferred):
        for rank, hit in enumerate(ranking, start=1):
            key = hit.record.memory_id
            fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + rank)
            seen.setdefault(key, hit)
    order = sorted(fused, key=lambda key: -fused[key])  # stable on ties
    return [replace(seen[key], score=fused[key]) for key in order[:limit]]


def search_preferring(
    store: MemoryStore,
    user_id: str,
    query: str,
    vector: np.ndarray | None,
    limit: int,
    *,
    mode: SearchMode | None = None,
    time_from: datetime | None = None,
    time_to: datetime | None = None,
    span: tuple[datetime, datetime] | None = None,
    roles: Sequence[str] | None = None,
    depth: int = 50,
) -> list[ScoredMemory]:
    """``store.search`` of the best ``limit``, preferring the memories of events in ``span`` (within
    ``time_from``..``time_to``) and those made from turns of ``roles`` (each a ranking of its own, ``depth`` deep,
    fused by ``prefer``); a plain search when neither is given or the span lies outside the bounds."""
    if span is not None:
        start = max(span[0], time_from) if time_from is not None else span[0]
        end = min(span[1], time_to) if time_to is not None else span[1]
        span = (start, end) if start <= end else None
    if span is None and roles is None:
        return store.search(user_id, query, vector, limit, mode=mode, time_from=time_from, time_to=time_to)
    depth = max(limit, depth)
    hits = store.search(user_id, query, vector, depth, mode=mode, time_from=time_from, time_to=time_to)
    preferred: list[list[ScoredMemory]] = []
    if span is not None:
        preferred.append(store.search(user_id, query, vector, depth, mode=mode, time_from=span[0], time_to=span[1]))
    if roles is not None:
        own = store.search(user_id, query, vector, depth, mode=mode, time_from=time_from, time_to=time_to, roles=roles)
        preferred.append(own)
    return prefer(hits, preferred, limit)
