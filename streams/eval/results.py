"""The run's results: metrics per system and cell, cost per stage, the environment."""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from streams.cost import STAGES
from streams.eval.checkpoint import decode_questions
from streams.eval.judge import JudgeCost, summarise
from streams.eval.metrics import ABSTENTION, ADVERSARIAL, ALL, OVERALL, QuestionEval, aggregate
from streams.eval.options import SLEEP_SUFFIX, Cell, EvalOptions
from streams.eval.systems import COST_FIELDS
from streams.loaders import Conversation
from streams.settings import Settings
from streams.tokens import count_tokens


@dataclass
class RunStats:
    ingested_users: int = 0
    ingested_turns: int = 0
    evaluated_units: int = 0
    reused_units: int = 0
    memories_opened: int = 0
    judged_questions: int = 0


@dataclass
class Unit:
    """One (system, config) over all users: what goes into the results."""

    system: str
    config: str
    label: str
    cell: Cell | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    ingests: list[dict[str, Any]] = field(default_factory=list)


def sum_costs(costs: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    total: dict[str, dict[str, Any]] = {}
    for c in costs:
        for stage, vals in c.items():
            acc = total.setdefault(stage, {f: 0 for f in COST_FIELDS})
            for f in acc:
                acc[f] += vals.get(f, 0)
    order = {s: i for i, s in enumerate((*STAGES, "indexing", "retrieval", "search"))}
    return {s: total[s] for s in sorted(total, key=lambda s: order.get(s, 99))}


def _credited(q: QuestionEval, credit: str) -> QuestionEval:
    """The same ranking credited otherwise: ``facts`` = summaries credited with no turn (a lower bound);
    ``batch`` = summaries credited with every turn of their STM batch that the batch's memories cite (the older,
    generous figure: a summary then covers turns it does not state)."""
    kinds = list(q.extra.get("kinds") or [])
    if not kinds:
        return q
    if credit == "facts":
        retrieved = tuple(() if k == "summary" else item for item, k in zip(q.retrieved, kinds, strict=True))
    else:
        batch = q.extra.get("batch") or q.retrieved
        retrieved = tuple(
            tuple(b) if k == "summary" else item for item, b, k in zip(q.retrieved, batch, kinds, strict=True)
        )
    if q.retrieved_sessions is not None:
        sessions = (
            None
            if credit == "batch"
            else tuple(() if k == "summary" else s for s, k in zip(q.retrieved_sessions, kinds, strict=True))
        )
    else:
        sessions = None
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


@dataclass(frozen=True)
class RunFacts:
    """What the results record about the run itself."""

    stats: RunStats
    data_sha: str
    fingerprint: Mapping[str, Any]
    started: datetime
    wall_s: float


def results(
    opts: EvalOptions,
    settings: Settings,
    models: Any,
    convs: Sequence[Conversation],
    units: Sequence[Unit],
    facts: RunFacts,
) -> dict[str, Any]:
    stats, data_sha, fp, started, wall_s = facts.stats, facts.data_sha, facts.fingerprint, facts.started, facts.wall_s
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
        entry["cost"] = sum_costs(costs)
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
                metrics_facts_only=aggregate([_credited(q, "facts") for q in qes], ks),
                metrics_batch_credit=aggregate([_credited(q, "batch") for q in qes], ks),
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
