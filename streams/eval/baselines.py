"""Raw-turn baselines for the recall evaluation: BM25, naive dense RAG, and the full history.

All share one interface, the one the memory pipeline is measured through::

    retriever.fit(turns)                       # index raw turns, per user (a user = one conversation)
    retriever.retrieve(user_id, query, k) -> list[RetrievedItem]

A retrieved raw turn covers exactly itself (``source_turn_ids == [turn_id]``); its text is what a reader
would be handed: ``"[YYYY-MM-DD HH:MM] speaker: content"``. Indexing uses ``"speaker: content"``.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from schemas.records import RawTurn
from streams.eval.metrics import QuestionEval, question_eval
from streams.text import tokenize
from streams.tokens import count_tokens

__all__ = [
    "Answer",
    "BM25Retriever",
    "FullTextRetriever",
    "NaiveRAGRetriever",
    "RetrievedItem",
    "Retriever",
    "UnknownUserError",
    "ask",
    "evaluate_retriever",
    "index_text",
    "reader_text",
    "tokenize",
]


@dataclass(frozen=True)
class RetrievedItem:
    text: str
    source_turn_ids: list[str]
    score: float


class UnknownUserError(KeyError):
    """``retrieve`` was asked about a user the retriever was never fitted on."""


class Retriever(Protocol):
    def retrieve(self, user_id: str, query: str, k: int) -> list[RetrievedItem]: ...


def index_text(turn: RawTurn) -> str:
    """What the baselines index: speaker (or role) and content."""
    return f"{turn.speaker or turn.role}: {turn.content}"


def reader_text(turn: RawTurn) -> str:
    """What a reader is handed for a raw turn: its time, speaker and content."""
    return f"[{turn.timestamp:%Y-%m-%d %H:%M}] {index_text(turn)}"


def _group_by_user(turns: Iterable[RawTurn]) -> dict[str, list[RawTurn]]:
    out: dict[str, list[RawTurn]] = defaultdict(list)
    for t in turns:
        out[t.user_id].append(t)
    return dict(out)


class _PerUser:
    """Turns per user; ``fit`` replaces the index of every user present in the input."""

    def __init__(self) -> None:
        self._turns: dict[str, list[RawTurn]] = {}

    def fit(self, turns: Iterable[RawTurn]) -> None:
        for user_id, user_turns in _group_by_user(turns).items():
            self._turns[user_id] = user_turns
            self._fit_user(user_id, user_turns)

    def _fit_user(self, user_id: str, turns: list[RawTurn]) -> None:  # pragma: no cover - overridden
        pass

    def _user_turns(self, user_id: str) -> list[RawTurn]:
        if user_id not in self._turns:
            raise UnknownUserError(f"{type(self).__name__} was not fitted on user {user_id!r}")
        return self._turns[user_id]

    def _items(self, turns: list[RawTurn], order: Sequence[int], scores: Sequence[float]) -> list[RetrievedItem]:
        return [
            RetrievedItem(text=reader_text(turns[i]), source_turn_ids=[turns[i].turn_id], score=float(s))
            for i, s in zip(order, scores, strict=True)
        ]


class _BM25Index:
    def __init__(self, docs: list[list[str]], k1: float, b: float) -> None:
        self.n = len(docs)
        self.lengths = np.array([len(d) for d in docs], dtype=np.float64)
        self.avgdl = float(self.lengths.mean()) if self.n else 0.0
        postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, doc in enumerate(docs):
            for term, tf in Counter(doc).items():
                postings[term].append((i, tf))
        self.postings = {
            t: (np.array([d for d, _ in p], dtype=np.int64), np.array([f for _, f in p], dtype=np.float64))
            for t, p in postings.items()
        }
        # Okapi idf, shifted by +1 inside the log (Lucene) so very common terms never score negative
        self.idf = {t: math.log(1.0 + (self.n - len(p[0]) + 0.5) / (len(p[0]) + 0.5)) for t, p in self.postings.items()}
        self.k1 = k1
        self.b = b
        avg = self.avgdl or 1.0
        self.norm = k1 * (1.0 - b + b * self.lengths / avg)

    def scores(self, query_terms: Iterable[str]) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float64)
        for term in dict.fromkeys(query_terms):  # each distinct query term once
            hit = self.postings.get(term)
            if hit is None:
                continue
            docs, tf = hit
            out[docs] += self.idf[term] * tf * (self.k1 + 1.0) / (tf + self.norm[docs])
        return out


class BM25Retriever(_PerUser):
    """Okapi BM25 over raw turns, one index per user (k1=1.5, b=0.75 by default).

    ``score(D, Q) = sum_{q in set(Q)} idf(q) * tf(q,D) * (k1+1) / (tf(q,D) + k1 * (1 - b + b*|D|/avgdl))`` with
    ``idf(q) = ln(1 + (N - df + 0.5) / (df + 0.5))``. Only turns with a positive score are returned (so fewer than
    k when the query shares few terms with the history); ties keep chronological order.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75, tokenizer: Callable[[str], list[str]] = tokenize) -> None:
        super().__init__()
        self.k1 = k1
        self.b = b
        self.tokenizer = tokenizer
        self._index: dict[str, _BM25Index] = {}

    def _fit_user(self, user_id: str, turns: list[RawTurn]) -> None:
        self._index[user_id] = _BM25Index([self.tokenizer(index_text(t)) for t in turns], self.k1, self.b)

    def retrieve(self, user_id: str, query: str, k: int) -> list[RetrievedItem]:
        turns = self._user_turns(user_id)
        scores = self._index[user_id].scores(self.tokenizer(query))
        order = [int(i) for i in np.argsort(-scores, kind="stable")[:k] if scores[i] > 0]
        return self._items(turns, order, [scores[i] for i in order])


class NaiveRAGRetriever(_PerUser):
    """Dense top-k over raw turns: cosine similarity of L2-normalised embeddings (``embed`` must normalise;
    vectors are re-normalised defensively). Always returns min(k, history length) turns; ties keep
    chronological order."""

    def __init__(self, embed: Callable[[list[str]], np.ndarray]) -> None:
        super().__init__()
        self.embed = embed
        self._vectors: dict[str, np.ndarray] = {}
        self._query_cache: dict[str, np.ndarray] = {}

    def prefetch_queries(self, queries: Sequence[str]) -> None:
        """Embed upcoming queries in one batch (much faster than one call per query); cleared by each use."""
        todo = [q for q in dict.fromkeys(queries) if q not in self._query_cache]
        if todo:
            self._query_cache.update(zip(todo, self._normalise(self.embed(todo)), strict=True))

    @staticmethod
    def _normalise(vecs: np.ndarray) -> np.ndarray:
        vecs = np.asarray(vecs, dtype=np.float32)
        if vecs.ndim == 1:
            vecs = vecs[None, :]
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.where(norms == 0, 1.0, norms)

    def _fit_user(self, user_id: str, turns: list[RawTurn]) -> None:
        texts = [index_text(t) for t in turns]
        self._vectors[user_id] = self._normalise(self.embed(texts)) if texts else np.zeros((0, 1), np.float32)
        if len(self._vectors[user_id]) != len(turns):
            raise ValueError(f"embed returned {len(self._vectors[user_id])} vectors for {len(turns)} texts")

    def retrieve(self, user_id: str, query: str, k: int) -> list[RetrievedItem]:
        turns = self._user_turns(user_id)
        if not turns or k <= 0:
            return []
        cached = self._query_cache.pop(query, None)
        q = cached if cached is not None else self._normalise(self.embed([query]))[0]
        scores = self._vectors[user_id] @ q
        order = [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
        return self._items(turns, order, [float(scores[i]) for i in order])


class FullTextRetriever(_PerUser):
    """The whole history, every turn in chronological order, whatever k is (``unbounded``): recall is the
    ceiling, and the cost is the token count of the entire history."""

    unbounded = True

    def retrieve(self, user_id: str, query: str, k: int) -> list[RetrievedItem]:
        turns = self._user_turns(user_id)
        return self._items(turns, list(range(len(turns))), [0.0] * len(turns))


def as_retrieved(hit: Any) -> RetrievedItem:
    """Adapt a pipeline search hit (``.record.text``, ``.record.source_turn_ids``, ``.score``) or any object
    with ``.text`` and ``.source_turn_ids``; a ``RetrievedItem`` (or a subclass) is returned as it is."""
    if isinstance(hit, RetrievedItem):
        return hit
    rec = getattr(hit, "record", hit)
    return RetrievedItem(
        text=str(rec.text), source_turn_ids=list(rec.source_turn_ids), score=float(getattr(hit, "score", 0.0))
    )


@dataclass(frozen=True)
class Answer:
    """One question asked of a retriever: its evaluation, the items (what a reader would be handed) and the
    seconds the retrieval took."""

    evaluation: QuestionEval
    items: list[RetrievedItem]
    seconds: float


def ask(conv: Any, retriever: Retriever, k: int, count: Callable[[str], int] | None = None) -> Iterator[Answer]:
    """Ask every question of one conversation at depth ``k``. An ``unbounded`` retriever (the whole history,
    whatever the query) is asked once; a retriever with ``prefetch_queries`` gets the questions first (batch query
    embedding, its time counted in the first answer); a ``dated`` retriever also gets each question's date as
    ``as_of``. Items that carry ``kind`` / ``batch_turn_ids`` (memories)
    put them in the evaluation's ``extra``."""
    unbounded = bool(getattr(retriever, "unbounded", False))
    dated = bool(getattr(retriever, "dated", False))  # takes the question's date (``as_of``)
    tokens = count or lru_cache(maxsize=1 << 16)(count_tokens)  # the same texts come back question after question
    t2s = {t.turn_id: t.session_id for t in conv.turns}
    prefetch = getattr(retriever, "prefetch_queries", None)
    t0 = time.perf_counter()
    if prefetch is not None:
        prefetch([qa.question for qa in conv.qa])
    pending = time.perf_counter() - t0
    history: list[RetrievedItem] | None = None
    for qa in conv.qa:
        t1 = time.perf_counter()
        if history is None or not unbounded:
            hits = (
                retriever.retrieve(conv.user_id, qa.question, k, as_of=qa.question_date)  # type: ignore[call-arg]
                if dated
                else retriever.retrieve(conv.user_id, qa.question, k)
            )
            history = [as_retrieved(h) for h in hits]
        items = history
        seconds = time.perf_counter() - t1 + pending
        pending = 0.0
        qe = question_eval(qa, items, turn_to_session=t2s, unbounded=unbounded, count_tokens=tokens)
        kinds = [getattr(it, "kind", None) for it in items]
        if any(kinds):
            batch = tuple(tuple(getattr(it, "batch_turn_ids", None) or it.source_turn_ids) for it in items)
            qe = replace(qe, extra={"kinds": kinds, "batch": batch})
        yield Answer(qe, items, seconds)


def evaluate_retriever(
    conversations: Iterable[Any],
    retriever: Retriever,
    k: int,
    *,
    with_sessions: bool = True,
    on_question: Callable[[QuestionEval], None] | None = None,
) -> list[QuestionEval]:
    """Ask every question of every conversation (``streams.loaders.Conversation``) once at depth ``k`` (the
    largest k to report; smaller k are prefixes) and return the per-question evaluations for
    ``streams.eval.metrics.aggregate``. The retriever must already hold each conversation's turns."""
    tokens = lru_cache(maxsize=1 << 16)(count_tokens)
    out: list[QuestionEval] = []
    for conv in conversations:
        for answer in ask(conv, retriever, k, tokens):
            qe = answer.evaluation if with_sessions else replace(answer.evaluation, retrieved_sessions=None)
            out.append(qe)
            if on_question is not None:
                on_question(qe)
    return out
