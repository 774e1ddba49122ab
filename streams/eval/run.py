"""The benchmark run behind ``lightmem eval``: LightMem Streams against raw-turn baselines, scored by evidence recall.

One run = one benchmark file, a list of systems, one set of k, and for LightMem a grid of cells (compression rate ×
STM threshold; one cell by default: the configured values). Per user (LoCoMo: a conversation; LongMemEval: one
question's haystack):

- **fulltext / naiverag / bm25** (``streams.eval.baselines``) index the raw turns and answer every question;
  NaiveRAG embeds with the same encoder the memory uses;
- **lightmem**: the real embedded pipeline (``streams.api.Memory``) on a Settings copy whose state and Qdrant
  storage live inside the output directory (the user's store is never touched), ``add_turns`` in chunks,
  ``flush(user)``, then ``search(question, user, limit=max k)`` per question. Every cell reuses the loaded models
  (encoder, compressor, extractor): only the rate (an argument of the compressor) and the STM threshold (read
  from settings at run time) change, and each cell writes its own collection.

Every finished unit is appended to ``checkpoint.jsonl`` in the output directory, keyed by
``(kind, system, config, user)`` with ``kind`` ``ingest`` (LightMem: the store holds this user) or ``eval``
(questions answered and scored). Rerunning with the same output directory skips what is there: a user whose
``eval`` record exists is not touched (no Memory is opened for a cell whose users are all done), and a user whose
``ingest`` record exists is searched again without being re-ingested. The first line is a header naming the
data file (sha256) and the pipeline fingerprint; resuming with another file or other settings is refused.

Tokens read (``tokens@k``) are counted on exactly the texts an answerer would be handed: a raw turn as
``[YYYY-MM-DD HH:MM] speaker: content``, a memory as ``[YYYY-MM-DD] text`` (first event date; a range when its
source turns span days).

Credit: a raw turn covers itself; a memory covers the turns it states (a fact its cited sources, a summary the
turns its sentences cite). The results also carry two other credits of the same ranking: ``metrics_facts_only``
(summaries credited with nothing) and ``metrics_batch_credit`` (each summary credited with every turn of its STM
batch that the batch's memories cite: generous, and only for comparison with older reports).

Modules: ``options`` (what a run is), ``checkpoint`` (resumable units), ``systems`` (the baselines and LightMem
behind one ``fit``/``retrieve`` interface), ``results`` (metrics and cost); this one runs the loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from streams.eval.baselines import ask
from streams.eval.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    decode_questions,
    encode_questions,
    sha256_conversations,
    sha256_file,
)
from streams.eval.judge import Judge, JudgeCost
from streams.eval.options import (
    BENCHMARKS,
    RAW_CONFIG,
    SLEEP_SUFFIX,
    SYSTEM_LABELS,
    SYSTEMS,
    Cell,
    EvalError,
    EvalOptions,
    cell_settings,
    default_out_dir,
    fingerprint,
    grid,
    load_benchmark,
)
from streams.eval.results import RunFacts, RunStats, Unit, results
from streams.eval.systems import COST_FIELDS, BaselineSystem, CountingStages, LightMemSystem, System
from streams.loaders import Conversation
from streams.settings import Settings
from streams.stages import Stages
from streams.tokens import count_tokens

__all__ = [
    "BENCHMARKS",
    "CHECKPOINT",
    "SYSTEMS",
    "Cell",
    "Checkpoint",
    "CountingStages",
    "EvalError",
    "EvalOptions",
    "decode_questions",
    "default_out_dir",
    "encode_questions",
    "load_benchmark",
    "run_eval",
]

RESULTS = "results.json"
REPORT = "report.md"


class _Models:
    """Loads ``Stages`` once, on first use (a fully resumed run loads no model at all)."""

    def __init__(self, settings: Settings, stages: Stages | None) -> None:
        self.settings = settings
        self._stages = stages
        self.load_s = 0.0

    @property
    def stages(self) -> Stages:
        if self._stages is None:
            t0 = time.perf_counter()
            self._stages = Stages(self.settings)
            self.load_s = time.perf_counter() - t0
        return self._stages

    @property
    def loaded(self) -> bool:
        return self._stages is not None

    def for_cell(self, settings: Settings) -> CountingStages:
        base = self.stages
        return CountingStages(settings, encoder=base.encoder, compressor=base.compressor, extractor=base.extractor)


class _Bars:
    def __init__(self, enabled: bool, console: Console | None) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
        )

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        tid: TaskID = self.progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            self.progress.advance(tid, n)

        try:
            yield advance
        finally:
            self.progress.remove_task(tid)


@dataclass
class _Run:
    """What every unit of one run shares."""

    opts: EvalOptions
    settings: Settings
    ckpt: Checkpoint
    models: _Models
    bars: _Bars
    stats: RunStats
    judge: Judge | None
    judge_systems: set[str]

    def judged(self, system: str) -> Judge | None:
        return self.judge if system in self.judge_systems else None


def _reusable(rec: dict[str, Any] | None, opts: EvalOptions, judged: bool) -> bool:
    if rec is None:
        return False
    if rec.get("depth", 0) < opts.max_k:
        return False
    if judged and (rec.get("judge") is None or rec.get("judge_k") != opts.judge_k):
        return False
    return True


def _open_checkpoint(opts: EvalOptions, settings: Settings, data_sha: str) -> tuple[Checkpoint, dict[str, Any]]:
    ckpt = Checkpoint(opts.out / CHECKPOINT)
    fp = fingerprint(settings, opts)
    if ckpt.header is None:
        ckpt.append({"kind": "header", "benchmark": opts.benchmark, "data_sha256": data_sha, "fingerprint": fp})
        return ckpt, fp
    h = ckpt.header
    if h.get("benchmark") != opts.benchmark or h.get("data_sha256") != data_sha:
        raise EvalError(
            f"{opts.out} holds a run of {h.get('benchmark')} over data sha256 {str(h.get('data_sha256'))[:12]}…; "
            f"this run is {opts.benchmark} over {data_sha[:12]}…: choose another --out"
        )
    old = h.get("fingerprint") or {}
    if old != fp:
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        raise EvalError(
            f"{opts.out} was written with other pipeline settings ({', '.join(diff)}): choose another --out"
        )
    return ckpt, fp


def _units(settings: Settings, opts: EvalOptions) -> list[Unit]:
    units: list[Unit] = []
    for s in opts.systems:
        if s != "lightmem":
            units.append(Unit(s, RAW_CONFIG, SYSTEM_LABELS[s]))
            continue
        for c in grid(settings, opts):
            units.append(Unit("lightmem", c.id, c.label, cell=c))
            if opts.compact:
                units.append(Unit("lightmem", f"{c.id}{SLEEP_SUFFIX}", f"{c.label} + sleep-time update", cell=c))
    return units


def run_eval(
    opts: EvalOptions,
    settings: Settings,
    *,
    stages: Stages | None = None,
    console: Console | None = None,
    conversations: Sequence[Conversation] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the evaluation; write results.json, report.md and plots into ``opts.out``; return results.

    ``conversations`` replaces the data file (tests, programmatic use); ``stages`` reuses loaded models.
    """
    opts.validate(need_data=conversations is None)
    t_run = time.perf_counter()
    judge: Judge | None = Judge(settings.llm) if opts.judge else None  # fails early without an endpoint
    if conversations is not None:
        convs = list(conversations)[: opts.limit] if opts.limit else list(conversations)
        data_sha = sha256_conversations(convs)
    else:
        assert opts.data is not None
        convs = load_benchmark(opts.benchmark, opts.data, opts.limit)
        data_sha = sha256_file(opts.data)
    if not convs:
        raise EvalError(f"{opts.data or 'conversations'}: no conversations to evaluate")
    opts.out.mkdir(parents=True, exist_ok=True)
    ckpt, fp = _open_checkpoint(opts, settings, data_sha)
    run = _Run(
        opts,
        settings,
        ckpt,
        _Models(settings, stages),
        _Bars(opts.show_progress, console),
        RunStats(),
        judge,
        set(opts.judge_systems or opts.systems) if judge else set(),
    )
    units = _units(settings, opts)
    started = datetime.now(UTC)
    with run.bars.progress:
        with run.bars.task(f"{opts.benchmark}: systems × users", total=len(units) * len(convs)) as overall:
            for i, unit in enumerate(units):
                if unit.config.endswith(SLEEP_SUFFIX):
                    continue  # the "+sleep" unit is filled by its cell's run, right after it
                after = units[i + 1] if unit.cell is not None and opts.compact else None
                _run_unit(run, unit, convs, overall, after)
    if judge is not None:
        judge.close()

    facts = RunFacts(run.stats, data_sha, fp, started, time.perf_counter() - t_run)
    out = results(opts, settings, run.models, convs, units, facts)
    from streams.eval.report import render_markdown

    (opts.out / RESULTS).write_text(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    (opts.out / REPORT).write_text(render_markdown(out))
    if opts.plots:
        from streams.eval.plots import write_plots

        out["plots"] = [str(p.name) for p in write_plots(out, opts.out)]
        (opts.out / RESULTS).write_text(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    return out


def _system(run: _Run, unit: Unit) -> System:
    if unit.cell is None:
        embed = run.models.stages.encoder.embed if unit.system == "naiverag" else None
        return BaselineSystem(unit.system, embed)
    cs = cell_settings(run.settings, run.opts.out, unit.cell)
    return LightMemSystem(cs, lambda: run.models.for_cell(cs), run.opts.chunk_turns)


def _run_unit(
    run: _Run, unit: Unit, convs: Sequence[Conversation], overall: Callable[[int], None], after: Unit | None
) -> None:
    """Every user through one system: reuse what the checkpoint holds, else fit (ingest), ask, judge, record."""
    judge = run.judged(unit.system)
    system: System | None = None
    try:
        for conv in convs:
            user = conv.user_id
            rec = run.ckpt.get("eval", unit.system, unit.config, user)
            ing = run.ckpt.get("ingest", unit.system, unit.config, user) if unit.cell is not None else {}
            if _reusable(rec, run.opts, judge is not None) and ing is not None:
                assert rec is not None
                run.stats.reused_units += 1
                unit.evals.append(rec)
                if unit.cell is not None:
                    unit.ingests.append(ing)
            else:
                if system is None:
                    system = _system(run, unit)
                rec, ing = _evaluate_user(run, unit, system, conv, ing)
            overall(1)
            if after is not None:
                system = _after_sleep(run, after, conv, ing or {}, system, unit)
    finally:
        if system is not None:
            run.stats.memories_opened += getattr(system, "opened", 0)
            system.close()


def _evaluate_user(
    run: _Run, unit: Unit, system: System, conv: Conversation, ing: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    user = conv.user_id
    if isinstance(system, LightMemSystem):
        if ing is None:
            with run.bars.task(f"{unit.label} · ingest {user}", total=len(conv.turns)) as step:
                system.on_chunk = step
                ing = {"kind": "ingest", "system": unit.system, "config": unit.config, "user": user}
                ing.update(system.fit(conv))
            run.ckpt.append(ing)
            run.stats.ingested_users += 1
            run.stats.ingested_turns += len(conv.turns)
        else:
            system.load_batches(user, ing, conv)
        fit: dict[str, Any] = {}
    else:
        fit = system.fit(conv)
    rec = _ask_user(run, unit, system, conv, fit)
    unit.evals.append(rec)
    if ing is not None and unit.cell is not None:
        unit.ingests.append(ing)
    return rec, ing


def _ask_user(run: _Run, unit: Unit, system: System, conv: Conversation, fit: dict[str, Any]) -> dict[str, Any]:
    """Every question of one user: scored, judged when asked, appended to the checkpoint."""
    opts = run.opts
    judge = run.judged(unit.system) if not unit.config.endswith(SLEEP_SUFFIX) else None
    tokens = lru_cache(maxsize=1 << 16)(count_tokens)
    qes, contexts, seconds = [], [], 0.0
    with run.bars.task(f"{unit.label} · {conv.user_id}", total=len(conv.qa)) as step:
        for answer in ask(conv, system, opts.max_k, tokens):
            qes.append(answer.evaluation)
            seconds += answer.seconds
            items = answer.items if system.unbounded else answer.items[: opts.judge_k]
            contexts.append([it.text for it in items])
            step(1)
    verdicts, judge_cost = _judge_user(run, judge, conv, contexts)
    stage = "search" if unit.cell is not None else "retrieval"
    rec = {
        "kind": "eval",
        "system": unit.system,
        "config": unit.config,
        "user": conv.user_id,
        "depth": opts.max_k,
        **encode_questions(qes, conv),
        "seconds": seconds,
        "cost": {
            **fit.get("cost", {}),
            stage: {**dict.fromkeys(COST_FIELDS, 0), "seconds": seconds, "items": len(conv.qa)},
        },
        "judge": verdicts,
        "judge_k": opts.judge_k if verdicts is not None else None,
        "judge_cost": judge_cost,
    }
    if "seconds" in fit:
        rec["ingest_seconds"] = fit["seconds"]
    run.ckpt.append(rec)
    run.stats.evaluated_units += 1
    return rec


def _judge_user(
    run: _Run, judge: Judge | None, conv: Conversation, contexts: Sequence[Sequence[str]]
) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    if judge is None:
        return None, None
    verdicts = judge.judge_many(list(zip(conv.qa, contexts, strict=True)))
    cost = JudgeCost()
    for v in verdicts:
        cost.add(v.cost)
    run.stats.judged_questions += len(verdicts)
    return [v.as_dict() for v in verdicts], cost.as_dict()


def _after_sleep(
    run: _Run, after: Unit, conv: Conversation, ing: dict[str, Any], system: System | None, unit: Unit
) -> System | None:
    """Run the sleep-time update over one user's fresh memory and score it again (the "+sleep" unit).

    Its ingest record is the cell's plus a "compaction" stage, so the cost table counts sleep-time work."""
    user = conv.user_id
    rec = run.ckpt.get("eval", "lightmem", after.config, user)
    if rec is not None:
        run.stats.reused_units += 1
        after.evals.append(rec)
        after.ingests.append(run.ckpt.get("ingest", "lightmem", after.config, user) or ing)
        return system
    if system is None:
        system = _system(run, unit)
    assert isinstance(system, LightMemSystem)
    system.load_batches(user, ing, conv)
    slept = system.compact(user)
    ing_after = {
        **ing,
        "config": after.config,
        "cost": {**ing.get("cost", {}), "compaction": slept["cost"]},
        "memories": slept["memories"],
        "compaction": slept["compaction"],
    }
    run.ckpt.append(ing_after)
    after.evals.append(_ask_user(run, after, system, conv, {}))
    after.ingests.append(ing_after)
    return system
