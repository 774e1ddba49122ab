"""Cost per stage: LLM calls, tokens, seconds, items. Every stage reports here, sleep-time included."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from schemas import StageCost
from streams import metrics

STAGES = ("compression", "segmentation", "extraction", "embedding", "upsert", "compaction")


def add_costs(a: StageCost, b: StageCost) -> StageCost:
    return StageCost(
        stage=a.stage,
        calls=a.calls + b.calls,
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        seconds=a.seconds + b.seconds,
        items=a.items + b.items,
    )


class CostLedger:
    """Accumulates StageCost records per stage."""

    def __init__(self) -> None:
        self._totals: dict[str, StageCost] = {}

    def record(self, cost: StageCost) -> None:
        """Add one unit of work's cost; it is also exported as Prometheus metrics (``streams.metrics``)."""
        metrics.observe_cost(cost)
        self._add(cost)

    def _add(self, cost: StageCost) -> None:
        prev = self._totals.get(cost.stage)
        self._totals[cost.stage] = cost if prev is None else add_costs(prev, cost)

    @contextmanager
    def timed(self, stage: str, items: int = 0) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(StageCost(stage=stage, seconds=time.perf_counter() - t0, items=items))  # type: ignore[arg-type]

    def totals(self) -> dict[str, StageCost]:
        return {s: self._totals[s] for s in STAGES if s in self._totals}

    def merge(self, other: CostLedger) -> None:
        for c in other.totals().values():
            self._add(c)  # already exported when ``other`` recorded it

    def reset(self) -> None:
        self._totals.clear()
