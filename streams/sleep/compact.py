"""Sleep-time update: incremental compaction of one user's long-term memory.

**What is new.** Each user has a compaction watermark (a time). A run considers as *targets* only the user's
memories of a compacted kind (``sleep.kinds``, default facts only) that came from ingestion after the watermark:
``updated_at > watermark`` and ``version == 1`` (ingestion writes version 1; every sleep-time change bumps the
version, so a memory rewritten by compaction is not new information and is never a target again — it remains a
candidate for newer memories). The first run of a user (no watermark) considers all of them. The store filters
by watermark and kind itself (``get_all(updated_after=, kinds=)``, an indexed range on ``updated_ts``), so
finding what is new costs what is new, not the size of the user's store; the version rule is applied here.

**Candidates.** For each target, oldest first, a dense search filtered by the user (and the target's kind) finds
its ``k`` nearest EARLIER memories: created strictly before the target, cosine similarity ≥
``similarity_threshold``. The search starts at ``k`` plus the few memories that are not earlier and deepens only
while hits above the threshold fill it, so its cost follows the target's close neighbours, not the store size.
Memories written in the same extraction batch share ``created_at`` and are not compared with each other.

**Summaries are excluded** by default: a summary is an overview of a whole STM batch whose sources are all the
turns of the batch; rewriting or deleting it against facts would blur provenance, and two summaries are rarely
"the same memory". With ``sleep.kinds = ["fact", "summary"]`` summaries are compacted too, each only against
earlier summaries.

**Decisions** (``streams.sleep.decide``): update / delete / ignore for each candidate, by the exact rule (same
normalised text: delete, no call), then the LLM — the user's targets in a few BATCHED calls, grouped by
overlapping neighbourhoods within ``sleep.max_prompt_tokens`` — or the offline rule. So the LLM bill follows the
new memories that have close earlier neighbours, in batches, not one call per memory. **Evidence is never
lost**:

- ``delete`` of an older memory (superseded by the target): the target absorbs the deleted memory's
  ``source_turn_ids``, ``event_timestamps`` and ``session_ids`` — an ``update`` change of the target with the
  same text and a bumped version, applied BEFORE the delete; the delete change keeps the whole old record;
- ``update`` of an older memory: the new text is written by the LLM from both memories, so the updated memory
  also takes the target's sources (union), is re-embedded and gets a bumped version;
- either way the memory that takes over turns is also searched by the words it was credited for: its search
  index reads its (new) text and what each memory it absorbed was found by (``absorb``).

**Changes are events**: every decision (ignores too — they are the audit trail) is a ``MemoryChange`` whose
``change_id`` is a uuid5 of (memory id, its version, action, the memories that caused it), so a resumed run that
decides the same thing produces the same ids. Candidates are found for every target first and decided
together; changes are then built target after target, oldest first, over an overlay of the run's own changes
(updated records, deleted ids): a candidate an earlier target deleted is not touched again, one it rewrote is
not rewritten again (``reconcile``) — the first decision stands, and each ignored decision is still recorded.
Embedded: each target's changes are appended to the change log at once, and the user's changes are applied
(``streams.sleep.apply``: one embedding batch) when the user is done. Kafka: they are produced to the
memory-changes topic and the LTM sink applies them.

**Resuming.** The watermark of a user moves (to the newest ``updated_at`` among its targets) only after all of
that user's changes are applied; a run that dies half-way redoes only unfinished users. Embedded, a user's
changes logged after its last completed run are re-applied first (idempotent), closing the gap between logging
and applying. A decision that fails after retries is dead-lettered (stage ``compact``) and the watermark still
moves, as extraction does with a failed batch; ``lightmem compact --full`` examines everything again.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from schemas.records import DeadLetter, MemoryChange, MemoryRecord, StageCost
from streams import ids
from streams.cost import add_costs
from streams.dlq import DeadLetterSink
from streams.ltm import MemoryStore
from streams.settings import Settings, SleepSettings
from streams.sleep.apply import ApplyReport, Embed, apply_changes
from streams.sleep.changelog import ChangeLog, Watermarks
from streams.sleep.decide import Candidate, Decider, Decision, normalise

log = logging.getLogger(__name__)

Emit = Callable[[Sequence[MemoryChange]], Awaitable[None]]
INITIAL_SLACK = 64  # not-earlier memories a first search makes room for before deepening


# -- pure parts ------------------------------------------------------------------------------------------


def select_targets(
    records: Sequence[MemoryRecord], watermark: datetime | None, kinds: Sequence[str]
) -> list[MemoryRecord]:
    """The user's memories new since the watermark (ingested, version 1, of a compacted kind), oldest first."""
    out = [r for r in records if r.kind in kinds and r.version == 1 and (watermark is None or r.updated_at > watermark)]
    return sorted(out, key=lambda r: (r.created_at, r.memory_id))


def find_candidates(
    store: MemoryStore,
    target: MemoryRecord,
    vector: np.ndarray,
    settings: SleepSettings,
    *,
    not_earlier: int = 0,
    overlay: dict[str, MemoryRecord | None] | None = None,
) -> list[Candidate]:
    """The target's ``k`` nearest earlier memories of its user and kind with cosine ≥ the threshold, best first.

    ``not_earlier`` is how many of the user's memories were not created before the target (room made in the
    first search); ``overlay`` holds this run's own changes (None = deleted) not yet visible in the store.
    """
    overlay = overlay or {}
    k, threshold = settings.k, settings.similarity_threshold
    limit = k + min(not_earlier, INITIAL_SLACK) + 1
    while True:
        hits = store.search(target.user_id, target.text, vector, limit, mode="dense", kinds=[target.kind])
        found: list[Candidate] = []
        for h in hits:
            if h.score < threshold:
                break
            rec = overlay.get(h.record.memory_id, h.record)
            if rec is None or rec.memory_id == target.memory_id or rec.created_at >= target.created_at:
                continue
            found.append(Candidate(rec, float(h.score)))
        exhausted = len(hits) < limit or (hits and hits[-1].score < threshold)
        if len(found) >= k or exhausted:
            return found[:k]
        limit *= 4


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _searched_text(record: MemoryRecord) -> str:
    return record.index_text or record.text


def absorb(base: MemoryRecord, others: Sequence[MemoryRecord], text: str, now: datetime) -> MemoryRecord:
    """``base`` with ``text``, the union of its and ``others``' provenance, version bumped, updated now.

    What the search index reads follows the provenance: the new text (when it changed), then what ``base`` and
    each of ``others`` were found by (their ``index_text`` or text), each normalised text once. A memory credited
    with a superseded memory's turns stays findable by that memory's words, and an updated memory's index never
    keeps reading only its old text."""
    turns = _unique([*base.source_turn_ids, *(t for o in others for t in o.source_turn_ids)])
    stamps = sorted(set(base.event_timestamps) | {t for o in others for t in o.event_timestamps})
    sessions = _unique([*base.session_ids, *(s for o in others for s in o.session_ids)])
    searched: dict[str, str] = {}  # normalised → the first text of that form
    for t in [*([text] if text != base.text else []), *map(_searched_text, [base, *others])]:
        searched.setdefault(normalise(t), t)
    return base.model_copy(
        update={
            "text": text,
            "index_text": "\n".join(searched.values()) if list(searched.values()) != [text] else None,
            "source_turn_ids": turns,
            "event_timestamps": stamps,
            "session_ids": sessions,
            "version": base.version + 1,
            "updated_at": now,
        }
    )


def change_id(memory_id: str, version: int, action: str, caused_by: Sequence[str]) -> str:
    """Deterministic: the same decision about the same version of a memory always has the same id."""
    return ids.derived_id("memory_change", memory_id, str(version), action, *sorted(caused_by))


def build_changes(
    target: MemoryRecord,
    candidates: Sequence[Candidate],
    decisions: Sequence[Decision],
    model: str,
    pipeline_version: str,
    now: datetime,
) -> list[MemoryChange]:
    """Change records for one target's decisions, in apply order: updates, the target absorbing what it
    supersedes, deletes, ignores."""
    by_id = {c.record.memory_id: c.record for c in candidates}
    updates: list[MemoryChange] = []
    deletes: list[MemoryChange] = []
    ignores: list[MemoryChange] = []
    superseded: list[MemoryRecord] = []
    for d in decisions:
        old = by_id[d.memory_id]
        common: dict[str, Any] = {
            "memory_id": old.memory_id,
            "user_id": old.user_id,
            "old_text": old.text,
            "old_version": old.version,
            "reason": d.reason,
            "caused_by": [target.memory_id],
            "model": d.model or model,
            "pipeline_version": pipeline_version,
            "at": now,
        }
        action = d.action
        new_record = None
        if action == "update":
            assert d.text is not None
            new_record = absorb(old, [target], d.text, now)
            if new_record.text == old.text and new_record.source_turn_ids == old.source_turn_ids:
                action = "ignore"  # an "update" that changes nothing
        cid = change_id(old.memory_id, old.version, action, [target.memory_id])
        if action == "update":
            assert new_record is not None
            updates.append(
                MemoryChange(
                    change_id=cid,
                    action="update",
                    new_text=new_record.text,
                    new_version=new_record.version,
                    old_record=old,
                    new_record=new_record,
                    **common,
                )
            )
        elif action == "delete":
            deletes.append(MemoryChange(change_id=cid, action="delete", old_record=old, **common))
            superseded.append(old)
        else:
            ignores.append(MemoryChange(change_id=cid, action="ignore", **common))
    absorbing: list[MemoryChange] = []
    if superseded:
        survivor = absorb(target, superseded, target.text, now)
        if (survivor.source_turn_ids, survivor.event_timestamps, survivor.index_text) != (
            target.source_turn_ids,
            target.event_timestamps,
            target.index_text,
        ):
            gone = [s.memory_id for s in superseded]
            absorbing.append(
                MemoryChange(
                    change_id=change_id(target.memory_id, target.version, "update", gone),
                    memory_id=target.memory_id,
                    user_id=target.user_id,
                    action="update",
                    old_text=target.text,
                    new_text=survivor.text,
                    old_version=target.version,
                    new_version=survivor.version,
                    reason="kept as the newer memory; took over the sources of superseded " + ", ".join(gone),
                    caused_by=gone,
                    model=model,
                    pipeline_version=pipeline_version,
                    at=now,
                    old_record=target,
                    new_record=survivor,
                )
            )
    return [*updates, *absorbing, *deletes, *ignores]


def overlay_changes(overlay: dict[str, MemoryRecord | None], changes: Sequence[MemoryChange]) -> None:
    for c in changes:
        if c.action in ("update", "revert"):
            overlay[c.memory_id] = c.new_record
        elif c.action == "delete":
            overlay[c.memory_id] = None


def reconcile(
    candidates: Sequence[Candidate], decisions: Sequence[Decision], overlay: dict[str, MemoryRecord | None]
) -> tuple[list[Candidate], list[Decision]]:
    """A target's candidates and decisions against this run's earlier changes (decisions of one batch were made
    together): a candidate deleted meanwhile is not touched again (its decision becomes an ``ignore``); a
    candidate whose text was rewritten meanwhile is not rewritten again (the first rewrite stands); a candidate
    that only gained provenance is taken in its current state."""
    now_candidates = [Candidate(overlay.get(c.record.memory_id, c.record) or c.record, c.score) for c in candidates]
    shown = {c.record.memory_id: c.record for c in candidates}
    out: list[Decision] = []
    for d in decisions:
        if d.action == "ignore" or d.memory_id not in overlay:
            out.append(d)
            continue
        current = overlay[d.memory_id]
        if current is None:
            out.append(Decision(d.memory_id, "ignore", reason=f"already deleted in this run (decided: {d.action})"))
        elif d.action == "update" and current.text != shown[d.memory_id].text:
            out.append(Decision(d.memory_id, "ignore", reason="already rewritten in this run (decided: update)"))
        else:
            out.append(d)
    return now_candidates, out


# -- reports ---------------------------------------------------------------------------------------------


@dataclass
class UserRun:
    user_id: str
    watermark_before: datetime | None
    watermark_after: datetime | None
    targets: int = 0
    candidates: int = 0
    changes: list[MemoryChange] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    recovered: int = 0
    batches: int = 0
    cost: StageCost = field(default_factory=lambda: StageCost(stage="compaction"))

    @property
    def actions(self) -> Counter[str]:
        return Counter(c.action for c in self.changes)


@dataclass
class CompactionReport:
    users: list[UserRun] = field(default_factory=list)
    model: str = ""  # who decided: the LLM ("llm:<model>") or the offline rule
    cost: StageCost = field(default_factory=lambda: StageCost(stage="compaction"))
    search_seconds: float = 0.0
    scan_seconds: float = 0.0
    apply: ApplyReport = field(default_factory=ApplyReport)

    @property
    def changes(self) -> list[MemoryChange]:
        return [c for u in self.users for c in u.changes]

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return [d for u in self.users for d in u.dead_letters]

    @property
    def targets(self) -> int:
        return sum(u.targets for u in self.users)

    @property
    def actions(self) -> Counter[str]:
        return Counter(c.action for c in self.changes)


# -- the runner ------------------------------------------------------------------------------------------


class Compactor:
    """Runs sleep-time compaction over a store.

    Embedded (default): changes go to the ``ChangeLog`` and are applied to ``store`` at once; watermarks live in
    ``Watermarks`` under ``settings.data_dir``. The Kafka agent passes its own ``emit`` (produce to the changes
    topic) and watermark store instead.
    """

    def __init__(
        self,
        settings: Settings,
        store: MemoryStore,
        embed: Embed,
        *,
        changelog: ChangeLog | None = None,
        watermarks: Watermarks | None = None,
        dead_letters: DeadLetterSink | None = None,
        decider: Decider | None = None,
        emit: Emit | None = None,
    ) -> None:
        from streams.dlq import DeadLetterLog

        self.settings = settings
        self.store = store
        self.embed = embed
        # embedded: the change log is where changes go; with ``emit`` (Kafka) the topic is, and no log is kept
        self.changelog = changelog if changelog is not None or emit is not None else ChangeLog.in_dir(settings.data_dir)
        self.watermarks = watermarks if watermarks is not None else Watermarks.in_dir(settings.data_dir)
        self.dead_letters = dead_letters or DeadLetterLog(settings.data_dir / "dead_letters.jsonl")
        self.decider = decider or Decider(settings.llm, settings.sleep, settings.pipeline_version)
        self._emit = emit
        self._pending: dict[str, list[MemoryChange]] = {}
        self.report = CompactionReport()

    @property
    def model(self) -> str:
        return self.decider.name

    async def aclose(self) -> None:
        await self.decider.aclose()

    # -- emitting and applying --------------------------------------------------------------------------
    async def emit(self, changes: Sequence[MemoryChange]) -> None:
        """One target's changes: produced (Kafka), or logged now and applied when the user is done (embedded)."""
        if not changes:
            return
        if self._emit is not None:
            await self._emit(changes)
            return
        assert self.changelog is not None
        self.changelog.append(changes)  # logged first: a crash before applying is repaired on the next run
        self._pending.setdefault(changes[0].user_id, []).extend(changes)

    def _apply_pending(self, user_id: str) -> None:
        """Embedded: apply a user's logged changes in one batch (one embedding call)."""
        pending = self._pending.pop(user_id, [])
        if pending:
            self.report.apply.merge(apply_changes(pending, self.store, self.embed))

    def _recover(self, user_id: str) -> int:
        """Embedded: re-apply the user's changes logged after its last completed run (idempotent)."""
        if self._emit is not None or self.changelog is None:
            return 0
        done = self.watermarks.completed_at(user_id)
        pending = [c for c in self.changelog.for_user(user_id) if done is None or c.at > done]
        if pending:
            self.report.apply.merge(apply_changes(pending, self.store, self.embed))
        return len(pending)

    # -- one user ---------------------------------------------------------------------------------------
    async def compact_user(self, user_id: str, *, full: bool = False) -> UserRun:
        started = time.perf_counter()
        sleep = self.settings.sleep
        recovered = self._recover(user_id)
        mark = None if full else self.watermarks.get(user_id)
        t0 = time.perf_counter()
        # only what changed since the watermark, of a compacted kind: filtered by the store, not scanned here
        records = self.store.get_all(user_id, updated_after=mark, kinds=sleep.kinds)
        targets = select_targets(records, mark, sleep.kinds)
        self.report.scan_seconds += time.perf_counter() - t0
        run = UserRun(user_id, mark, mark, targets=len(targets), recovered=recovered)
        cost = StageCost(stage="compaction", items=len(targets))
        if targets:
            vectors = self.store.get_vectors(user_id, [t.memory_id for t in targets])
            # the not-earlier counts only size a search's first page (it deepens while hits fill it), so counting
            # among the memories changed since the watermark rather than all of them changes no result
            created = sorted(r.created_at for r in records)
            plans: list[tuple[MemoryRecord, list[Candidate]]] = []
            for target in targets:
                vector = vectors.get(target.memory_id)
                if vector is None:
                    continue
                t1 = time.perf_counter()
                not_earlier = len(created) - bisect.bisect_left(created, target.created_at)
                candidates = find_candidates(self.store, target, vector, sleep, not_earlier=not_earlier)
                self.report.search_seconds += time.perf_counter() - t1
                if candidates:
                    plans.append((target, candidates))
                    run.candidates += len(candidates)
            now = datetime.now(UTC)
            result = await self.decider.decide(plans, now)
            cost = add_costs(cost, result.cost.model_copy(update={"items": 0, "seconds": 0.0}))
            run.batches += result.batches
            for dead in result.dead_letters:
                self.dead_letters.send(dead)
            run.dead_letters.extend(result.dead_letters)
            overlay: dict[str, MemoryRecord | None] = {}
            for target, candidates in plans:  # oldest first: a later target sees what an earlier one changed
                decisions = result.decisions.get(target.memory_id, [])
                current = overlay.get(target.memory_id, target)
                if current is None or not decisions:
                    continue
                now_candidates, now_decisions = reconcile(candidates, decisions, overlay)
                changes = build_changes(
                    current, now_candidates, now_decisions, self.model, self.settings.pipeline_version, now
                )
                await self.emit(changes)
                overlay_changes(overlay, changes)
                run.changes.extend(changes)
            self._apply_pending(user_id)
            newest = max(t.updated_at for t in targets)
            run.watermark_after = newest if mark is None or newest > mark else mark
        # only now, with every change of the user applied (or produced), does the watermark move; a user with
        # nothing new keeps its entry as it is (and a user with no memories gets none)
        if targets or recovered:
            self.watermarks.set(user_id, run.watermark_after, datetime.now(UTC))
        run.cost = cost.model_copy(update={"seconds": time.perf_counter() - started})
        return run

    # -- many users -------------------------------------------------------------------------------------
    async def run(
        self,
        users: Sequence[str] | None = None,
        *,
        full: bool = False,
        after_user: Callable[[UserRun], None] | None = None,
        concurrency: int | None = None,
    ) -> CompactionReport:
        """Compact ``users`` (default: every user in the store), several at a time (``llm.max_concurrency``).

        ``after_user`` is called once a user's run is complete (its watermark saved) — progress bars use it, and
        crash tests raise from it.
        """
        started = time.perf_counter()
        self.report = CompactionReport(model=self.model)
        todo = list(users) if users is not None else self.store.users()
        queue: asyncio.Queue[str] = asyncio.Queue()
        for user_id in todo:
            queue.put_nowait(user_id)

        async def worker() -> None:
            while True:
                try:
                    user = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                run = await self.compact_user(user, full=full)
                self.report.users.append(run)
                if after_user is not None:
                    after_user(run)

        n = max(1, min(concurrency or self.settings.llm.max_concurrency, len(todo) or 1))
        tasks = [asyncio.create_task(worker()) for _ in range(n)]
        try:
            for t in asyncio.as_completed(tasks):
                await t
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        total = StageCost(stage="compaction")
        for done in self.report.users:
            total = add_costs(total, done.cost.model_copy(update={"seconds": 0.0}))
        self.report.cost = total.model_copy(update={"seconds": time.perf_counter() - started})
        return self.report


async def run_compaction(
    settings: Settings,
    store: MemoryStore,
    embed: Embed,
    users: Sequence[str] | None = None,
    *,
    full: bool = False,
    decider: Decider | None = None,
    after_user: Callable[[UserRun], None] | None = None,
) -> CompactionReport:
    """One embedded compaction run (change log and watermarks under ``settings.data_dir``)."""
    compactor = Compactor(settings, store, embed, decider=decider)
    try:
        return await compactor.run(users, full=full, after_user=after_user)
    finally:
        if decider is None:
            await compactor.aclose()
