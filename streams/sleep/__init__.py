"""Sleep-time update: LightMem's offline consolidation of long-term memory, incremental and reversible.

- ``compact``  — per-user watermark, new memories × their k nearest EARLIER memories, change records, the runner;
- ``decide``   — update / delete / ignore per candidate: the exact rule, batched LLM calls, or the offline rule;
- ``prompts``  — the versioned compaction prompt and its response model;
- ``apply``    — applying (re-embedding) and reverting changes; shared by the embedded runner and the Kafka sink;
- ``changelog``— the embedded change log (audit trail, history, revert) and the watermarks.

The core takes a store and an embed function (``run_compaction(settings, store, embed, users)``), never the
``Memory`` facade. Embedded use goes through the facade::

    from streams.api import Memory
    with Memory() as m:
        report = m.compact()                    # every user; or m.compact(["alice"])
"""

from __future__ import annotations

from streams.sleep.apply import ApplyReport, RevertError, apply_changes, build_revert, change_hook
from streams.sleep.changelog import ChangeLog, Watermarks
from streams.sleep.compact import CompactionReport, Compactor, UserRun, run_compaction
from streams.sleep.decide import OFFLINE_MODEL, Candidate, Decider, Decision

__all__ = [
    "OFFLINE_MODEL",
    "ApplyReport",
    "Candidate",
    "ChangeLog",
    "CompactionReport",
    "Compactor",
    "Decider",
    "Decision",
    "RevertError",
    "UserRun",
    "Watermarks",
    "apply_changes",
    "build_revert",
    "change_hook",
    "run_compaction",
]
