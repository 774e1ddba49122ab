"""Sleep-time update: LightMem's offline consolidation of long-term memory, incremental and reversible.

- ``compact``  — per-user watermark, new memories × their k nearest EARLIER memories, change records, the runner;
- ``decide``   — update / delete / ignore per candidate: the exact rule, batched LLM calls, or the offline rule;
- ``prompts``  — the versioned compaction prompt and its response model;
- ``apply``    — applying (re-embedding) and reverting changes; shared by the embedded runner and the Kafka sink;
- ``changelog``— the embedded change log (audit trail, history, revert) and the watermarks;
- ``erase``    — erasure of a user, embedded.

Embedded use::

    from streams.api import Memory
    from streams.sleep import compact_memory
    with Memory() as m:
        report = compact_memory(m)              # every user; or compact_memory(m, ["alice"])
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from streams.sleep.apply import ApplyReport, RevertError, apply_changes, build_revert, change_hook
from streams.sleep.changelog import ChangeLog, Watermarks
from streams.sleep.compact import CompactionReport, Compactor, UserRun, run_compaction
from streams.sleep.decide import OFFLINE_MODEL, Candidate, Decider, Decision
from streams.sleep.erase import ErasureReport, erase_user

if TYPE_CHECKING:
    from streams.api import Memory

__all__ = [
    "OFFLINE_MODEL",
    "ApplyReport",
    "Candidate",
    "ChangeLog",
    "CompactionReport",
    "Compactor",
    "Decider",
    "Decision",
    "ErasureReport",
    "RevertError",
    "UserRun",
    "Watermarks",
    "apply_changes",
    "build_revert",
    "change_hook",
    "compact_memory",
    "erase_user",
    "run_compaction",
]


def compact_memory(memory: Memory, users: Sequence[str] | None = None, *, full: bool = False) -> CompactionReport:
    """Run a compaction over an embedded ``Memory`` (its store and encoder); its cost lands in ``memory.costs()``."""
    pipeline = memory.pipeline
    report = asyncio.run(run_compaction(memory.settings, pipeline.store, pipeline.stages.embed, users, full=full))
    pipeline.ledger.record(report.cost)
    return report
