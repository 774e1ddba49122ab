"""Preferring some memories of a query without dropping any: the plain ranking fused with rankings over the
memories a query points at (events of a named time span, ``streams.dates``; the asker's own turns,
``streams.asker``), by reciprocal-rank fusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from streams.ltm import ScoredMemory

__all__ = ["RRF_K", "prefer"]

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
