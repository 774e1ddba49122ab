"""Recall evaluation against benchmark evidence: metrics (``streams.eval.metrics``) and raw-turn baselines
(``streams.eval.baselines``). No LLM judge: a memory system is scored by whether the memories it retrieves
were extracted from the turns the benchmark marks as evidence."""

from streams.eval.baselines import (
    BM25Retriever,
    FullTextRetriever,
    NaiveRAGRetriever,
    RetrievedItem,
    Retriever,
    evaluate_retriever,
)
from streams.eval.metrics import (
    QuestionEval,
    aggregate,
    evidence_recall_at_k,
    ndcg_at_k,
    question_eval,
    recall_all_at_k,
    score_question,
    session_recall_at_k,
)

__all__ = [
    "BM25Retriever",
    "FullTextRetriever",
    "NaiveRAGRetriever",
    "QuestionEval",
    "RetrievedItem",
    "Retriever",
    "aggregate",
    "evaluate_retriever",
    "evidence_recall_at_k",
    "ndcg_at_k",
    "question_eval",
    "recall_all_at_k",
    "score_question",
    "session_recall_at_k",
]
