"""Retrieval metrics against benchmark evidence (no LLM judge).

Every function is pure and works on the *source turns* of the retrieved items, in rank order:
``retrieved`` is a sequence of items, each a collection of turn ids (a raw turn retrieves itself; a memory
retrieves the turns it was extracted from). ``evidence`` is the gold evidence turn ids of one question.

Rules shared by all metrics:

- evidence is a set: duplicate evidence ids count once;
- the union of the top-k items' source turns is what counts as "covered": an item repeating turns already
  covered adds nothing;
- a question with no evidence has no recall: the functions return ``None`` and the aggregator leaves it out
  of the means and counts it (``n_no_evidence``);
- ``k=None`` means "everything retrieved" (used for the full-text baseline, which hands over the whole history).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ABSTENTION",
    "ADVERSARIAL",
    "ALL",
    "OVERALL",
    "QuestionEval",
    "RetrievedLike",
    "aggregate",
    "covered_turns",
    "evidence_recall_at_k",
    "ndcg_at_k",
    "question_eval",
    "recall_all_at_k",
    "score_question",
    "session_recall_at_k",
]

ABSTENTION = "abstention"
ADVERSARIAL = "adversarial"
OVERALL = "overall"
ALL = "all"


def _top(retrieved: Sequence[Collection[str]], k: int | None) -> Sequence[Collection[str]]:
    if k is None:
        return retrieved
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return retrieved[:k]


def covered_turns(retrieved: Sequence[Collection[str]], k: int | None) -> set[str]:
    """Union of the source turns of the top-k items."""
    out: set[str] = set()
    for item in _top(retrieved, k):
        out.update(item)
    return out


def evidence_recall_at_k(
    retrieved: Sequence[Collection[str]], evidence: Collection[str], k: int | None
) -> float | None:
    """Share of the evidence turns covered by the top-k items; ``None`` when there is no evidence."""
    gold = set(evidence)
    if not gold:
        return None
    return len(gold & covered_turns(retrieved, k)) / len(gold)


def recall_all_at_k(retrieved: Sequence[Collection[str]], evidence: Collection[str], k: int | None) -> float | None:
    """1.0 when every evidence turn is covered by the top-k items, else 0.0; ``None`` when there is no evidence."""
    gold = set(evidence)
    if not gold:
        return None
    return 1.0 if gold <= covered_turns(retrieved, k) else 0.0


def ndcg_at_k(retrieved: Sequence[Collection[str]], evidence: Collection[str], k: int | None) -> float | None:
    """Coverage nDCG@k, fair to items of any granularity (raw turns or multi-turn memories).

    Definition. Walk the top-k items in rank order; item at rank ``r`` (1-based) newly covers some evidence
    turns (those no higher-ranked item covered). Number the evidence turns in the order they get covered,
    ``j = 1, 2, ...`` (turns newly covered by the same item take consecutive numbers). The j-th covered evidence
    turn earns ``1 / log2(max(r, j) + 1)``: it cannot sit higher than position ``j`` of an ideal turn-level list,
    nor higher than the rank of the item that brought it. Only ``j <= k`` is credited.

        DCG  = sum over covered evidence turns j <= k of 1 / log2(max(r_j, j) + 1)
        IDCG = sum_{j=1}^{min(|E|, k)} 1 / log2(j + 1)
        nDCG = DCG / IDCG  (in [0, 1]; ``None`` when |E| = 0)

    With one evidence turn per item this is ordinary binary nDCG (an item is relevant iff it covers a
    not-yet-covered evidence turn; redundant items earn nothing). A single memory at rank 1 covering all
    evidence scores 1, exactly like the evidence turns at ranks 1..|E|.
    """
    gold = set(evidence)
    if not gold:
        return None
    items = _top(retrieved, k)
    ideal_n = len(gold) if k is None else min(len(gold), k)
    if ideal_n == 0:
        return 0.0
    idcg = sum(1.0 / math.log2(j + 1) for j in range(1, ideal_n + 1))
    seen: set[str] = set()
    dcg = 0.0
    j = 0
    for rank, item in enumerate(items, start=1):
        new = [t for t in dict.fromkeys(item) if t in gold and t not in seen]
        for t in new:
            seen.add(t)
            j += 1
            if k is not None and j > k:
                break
            dcg += 1.0 / math.log2(max(rank, j) + 1)
    return dcg / idcg


def session_recall_at_k(
    retrieved: Sequence[Collection[str]],
    evidence_sessions: Collection[str],
    turn_to_session: Mapping[str, str],
    k: int | None,
) -> float | None:
    """Share of the evidence sessions with at least one source turn among the top-k items (LongMemEval).

    Turn ids missing from ``turn_to_session`` are ignored. ``None`` when there are no evidence sessions.
    """
    gold = set(evidence_sessions)
    if not gold:
        return None
    sessions = {turn_to_session[t] for t in covered_turns(retrieved, k) if t in turn_to_session}
    return len(gold & sessions) / len(gold)


# ---------------------------------------------------------------------------------------------------------------
# Per question and aggregated
# ---------------------------------------------------------------------------------------------------------------


class RetrievedLike(Protocol):
    """What a retriever returns: the text handed to a reader and the turns it came from."""

    @property
    def text(self) -> str: ...

    @property
    def source_turn_ids(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class QuestionEval:
    """One question's retrieval, reduced to what the metrics need.

    ``retrieved``: source turn ids per item in rank order; ``item_tokens``: tokens of each item's text
    (``streams.tokens.count_tokens``); ``retrieved_sessions``: the sessions of each item's source turns, when a
    turn → session map was given; ``unbounded``: the retriever hands over everything it returned whatever k is
    (full text), so every k scores the whole list.
    """

    question_id: str
    category: str
    is_abstention: bool
    is_adversarial: bool
    evidence_turn_ids: tuple[str, ...]
    evidence_session_ids: tuple[str, ...]
    retrieved: tuple[tuple[str, ...], ...]
    item_tokens: tuple[int, ...]
    retrieved_sessions: tuple[tuple[str, ...], ...] | None = None
    unbounded: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


def question_eval(
    qa: Any,
    items: Iterable[RetrievedLike],
    *,
    turn_to_session: Mapping[str, str] | None = None,
    unbounded: bool = False,
    count_tokens: Callable[[str], int] | None = None,
) -> QuestionEval:
    """Build a :class:`QuestionEval` from a ``streams.loaders.QAItem`` and the retrieved items.

    ``count_tokens`` defaults to ``streams.tokens.count_tokens``.
    """
    if count_tokens is None:
        from streams.tokens import count_tokens as _count

        count_tokens = _count
    items = list(items)
    retrieved = tuple(tuple(it.source_turn_ids) for it in items)
    sessions = None
    if turn_to_session is not None:
        sessions = tuple(
            tuple(dict.fromkeys(turn_to_session[t] for t in item if t in turn_to_session)) for item in retrieved
        )
    return QuestionEval(
        question_id=qa.question_id,
        category=qa.category,
        is_abstention=bool(qa.is_abstention),
        is_adversarial=bool(qa.is_adversarial),
        evidence_turn_ids=tuple(qa.evidence_turn_ids),
        evidence_session_ids=tuple(qa.evidence_session_ids),
        retrieved=retrieved,
        item_tokens=tuple(int(count_tokens(it.text)) for it in items),
        retrieved_sessions=sessions,
        unbounded=unbounded,
    )


def score_question(q: QuestionEval, ks: Sequence[int]) -> dict[str, float | None]:
    """Metrics of one question at each k: ``evidence_recall@k``, ``recall_all@k``, ``ndcg@k``,
    ``session_recall@k`` (when sessions are known) and ``tokens@k`` (tokens of the texts read)."""
    out: dict[str, float | None] = {}
    for k in ks:
        kk: int | None = None if q.unbounded else k
        out[f"evidence_recall@{k}"] = evidence_recall_at_k(q.retrieved, q.evidence_turn_ids, kk)
        out[f"recall_all@{k}"] = recall_all_at_k(q.retrieved, q.evidence_turn_ids, kk)
        out[f"ndcg@{k}"] = ndcg_at_k(q.retrieved, q.evidence_turn_ids, kk)
        if q.retrieved_sessions is not None:
            sess = q.retrieved_sessions if kk is None else q.retrieved_sessions[:kk]
            gold = set(q.evidence_session_ids)
            covered = {s for item in sess for s in item}
            out[f"session_recall@{k}"] = len(gold & covered) / len(gold) if gold else None
        out[f"tokens@{k}"] = float(sum(q.item_tokens if kk is None else q.item_tokens[:kk]))
    return out


def _group_names(q: QuestionEval) -> list[str]:
    if q.is_abstention:
        groups = [ABSTENTION]
    elif q.is_adversarial:
        groups = [ADVERSARIAL]
    else:
        groups = [f"cat:{q.category}", OVERALL]
    return [*groups, ALL]


def aggregate(questions: Sequence[QuestionEval], ks: Sequence[int]) -> dict[str, dict[str, float | int | None]]:
    """Mean metrics per group.

    Groups: ``cat:<category>`` for ordinary questions; ``abstention`` (LongMemEval ``_abs``) and
    ``adversarial`` (LoCoMo category 5) reported apart and NOT in their category; ``overall`` = all ordinary
    questions; ``all`` = every question. Each group has ``n`` (questions), ``n_with_evidence``, ``n_no_evidence``
    (left out of every recall/nDCG mean), the recall/nDCG means (``None`` when no question has evidence) and
    ``tokens@k`` means over all ``n`` questions. Groups are ordered: categories (sorted), overall, abstention,
    adversarial, all.
    """
    per_q = [(q, score_question(q, ks)) for q in questions]
    buckets: dict[str, list[tuple[QuestionEval, dict[str, float | None]]]] = {}
    for q, s in per_q:
        for g in _group_names(q):
            buckets.setdefault(g, []).append((q, s))

    def order(name: str) -> tuple[int, str]:
        rank = {OVERALL: 1, ABSTENTION: 2, ADVERSARIAL: 3, ALL: 4}.get(name, 0)
        return (rank, name)

    report: dict[str, dict[str, float | int | None]] = {}
    for name in sorted(buckets, key=order):
        rows = buckets[name]
        with_ev = [(q, s) for q, s in rows if set(q.evidence_turn_ids)]
        entry: dict[str, float | int | None] = {
            "n": len(rows),
            "n_with_evidence": len(with_ev),
            "n_no_evidence": len(rows) - len(with_ev),
        }
        metric_names = list(dict.fromkeys(m for _, s in rows for m in s))
        for m in metric_names:
            if m.startswith("tokens@"):
                entry[m] = sum(float(s[m] or 0.0) for _, s in rows) / len(rows)
            elif m.startswith("session_recall@"):
                vals = [s[m] for _, s in rows if s.get(m) is not None]  # evidence sessions, not turns
                entry[m] = sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]
            else:
                vals = [s[m] for _, s in with_ev if s.get(m) is not None]
                entry[m] = sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]
        report[name] = entry
    return report
