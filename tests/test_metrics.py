"""Recall metrics on hand-made cases, and the raw-turn baselines."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from schemas.records import RawTurn
from streams.eval.baselines import (
    BM25Retriever,
    FullTextRetriever,
    NaiveRAGRetriever,
    RetrievedItem,
    UnknownUserError,
    as_retrieved,
    evaluate_retriever,
    tokenize,
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
from streams.ids import turn_id
from streams.loaders import Conversation, QAItem
from streams.tokens import count_tokens


def lg(x: float) -> float:
    return 1.0 / math.log2(x + 1)


# -- recall ------------------------------------------------------------------------------------------------------


def test_evidence_recall_two_of_three():
    retrieved = [["a"], ["x"], ["b", "y"]]
    assert evidence_recall_at_k(retrieved, ["a", "b", "c"], 3) == pytest.approx(2 / 3)
    assert evidence_recall_at_k(retrieved, ["a", "b", "c"], 1) == pytest.approx(1 / 3)
    assert evidence_recall_at_k(retrieved, ["a", "b", "c"], 0) == 0.0
    assert evidence_recall_at_k(retrieved, ["a", "b", "c"], None) == pytest.approx(2 / 3)


def test_recall_all_flips_at_larger_k():
    retrieved = [["a"], ["x"], ["b"], ["c"]]
    ev = ["a", "b", "c"]
    assert recall_all_at_k(retrieved, ev, 3) == 0.0
    assert recall_all_at_k(retrieved, ev, 4) == 1.0
    assert recall_all_at_k(retrieved, ev, 10) == 1.0


def test_duplicates_do_not_double_count():
    # the same turn retrieved twice, and evidence listing a turn twice
    retrieved = [["a"], ["a"], ["a", "a"]]
    assert evidence_recall_at_k(retrieved, ["a", "b", "a"], 3) == pytest.approx(1 / 2)
    assert recall_all_at_k(retrieved, ["a", "a"], 1) == 1.0
    assert ndcg_at_k([["a"], ["a"], ["b"]], ["a", "b"], 3) == pytest.approx((lg(1) + lg(3)) / (lg(1) + lg(2)))


def test_empty_evidence_is_none():
    assert evidence_recall_at_k([["a"]], [], 5) is None
    assert recall_all_at_k([["a"]], [], 5) is None
    assert ndcg_at_k([["a"]], [], 5) is None
    assert session_recall_at_k([["a"]], [], {"a": "s1"}, 5) is None


def test_multi_turn_items_cover_their_sources():
    assert evidence_recall_at_k([["x", "a"], ["b", "c"]], ["a", "b", "c"], 1) == pytest.approx(1 / 3)
    assert evidence_recall_at_k([["x", "a"], ["b", "c"]], ["a", "b", "c"], 2) == 1.0


# -- nDCG --------------------------------------------------------------------------------------------------------


def test_ndcg_hand_computed():
    retrieved = [["x"], ["a"], ["y"], ["b"]]
    ev = ["a", "b"]
    idcg = lg(1) + lg(2)  # 1 + 0.6309
    # a at rank 2, b at rank 4: (1/log2 3 + 1/log2 5) / (1 + 1/log2 3) = 1.0616 / 1.6309
    assert ndcg_at_k(retrieved, ev, 4) == pytest.approx((lg(2) + lg(4)) / idcg)
    assert ndcg_at_k(retrieved, ev, 4) == pytest.approx(0.65094, abs=1e-4)
    assert ndcg_at_k(retrieved, ev, 2) == pytest.approx(lg(2) / idcg)
    assert ndcg_at_k(retrieved, ev, 1) == 0.0
    assert ndcg_at_k([["a"], ["b"]], ev, 10) == pytest.approx(1.0)
    assert ndcg_at_k([["b"], ["a"]], ev, 10) == pytest.approx(1.0)


def test_ndcg_multi_turn_items():
    ev = ["a", "b"]
    assert ndcg_at_k([["a", "b"]], ev, 5) == pytest.approx(1.0)  # one memory covering everything at rank 1
    # both turns arrive with the item at rank 2: each credited at max(2, j) = 2
    assert ndcg_at_k([["x"], ["a", "b"]], ev, 5) == pytest.approx(2 * lg(2) / (lg(1) + lg(2)))
    # k smaller than |E|: ideal has k evidence turns
    assert ndcg_at_k([["a", "b", "c"]], ["a", "b", "c"], 1) == pytest.approx(1.0)
    assert ndcg_at_k([["a"], ["b"], ["c"]], ["a", "b", "c"], 2) == pytest.approx(1.0)
    for retrieved in ([["a", "b"], ["c"]], [["c", "x"], ["a", "b"]], [["a", "b", "c"]]):
        for k in (1, 2, 3):
            assert 0.0 <= ndcg_at_k(retrieved, ["a", "b", "c"], k) <= 1.0 + 1e-12


def test_session_recall():
    t2s = {"a": "s1", "b": "s1", "c": "s2", "x": "s3"}
    assert session_recall_at_k([["a"], ["x"], ["c"]], ["s1", "s2"], t2s, 1) == 0.5
    assert session_recall_at_k([["a"], ["x"], ["c"]], ["s1", "s2"], t2s, 3) == 1.0
    assert session_recall_at_k([["b"], ["unknown"]], ["s1", "s2"], t2s, 5) == 0.5


# -- per question and aggregated ---------------------------------------------------------------------------------


def _qe(qid, cat, ev, retrieved, *, abst=False, adv=False, tokens=None, sessions=None, ev_sessions=()):
    return QuestionEval(
        question_id=qid,
        category=cat,
        is_abstention=abst,
        is_adversarial=adv,
        evidence_turn_ids=tuple(ev),
        evidence_session_ids=tuple(ev_sessions),
        retrieved=tuple(tuple(r) for r in retrieved),
        item_tokens=tuple(tokens if tokens is not None else [10] * len(retrieved)),
        retrieved_sessions=sessions,
    )


def test_aggregate_groups_per_category():
    qs = [
        _qe("q1", "1", ["a", "b"], [["a"], ["x"]]),  # recall@1 = 0.5
        _qe("q2", "1", ["c"], [["c"], ["y"]]),  # recall@1 = 1
        _qe("q3", "2", ["d"], [["x"], ["d"]]),  # recall@1 = 0, @2 = 1
        _qe("q4", "2", [], [["x"], ["y"]]),  # no evidence: excluded from means, counted
        _qe("q5", "5", ["e"], [["e"]], adv=True),
        _qe("q6", "temporal", [], [["z"]], abst=True, tokens=[4]),
    ]
    rep = aggregate(qs, [1, 2])
    assert list(rep) == ["cat:1", "cat:2", "overall", "abstention", "adversarial", "all"]
    assert rep["cat:1"]["n"] == 2 and rep["cat:1"]["evidence_recall@1"] == pytest.approx(0.75)
    assert rep["cat:1"]["recall_all@1"] == pytest.approx(0.5)
    assert rep["cat:2"]["n"] == 2 and rep["cat:2"]["n_with_evidence"] == 1 and rep["cat:2"]["n_no_evidence"] == 1
    assert rep["cat:2"]["evidence_recall@1"] == 0.0 and rep["cat:2"]["evidence_recall@2"] == 1.0
    assert rep["overall"]["n"] == 4 and rep["overall"]["n_no_evidence"] == 1
    assert rep["overall"]["evidence_recall@1"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert rep["adversarial"]["n"] == 1 and rep["adversarial"]["evidence_recall@1"] == 1.0
    assert "cat:5" not in rep and "cat:temporal" not in rep
    assert rep["abstention"]["n_with_evidence"] == 0 and rep["abstention"]["evidence_recall@1"] is None
    assert rep["abstention"]["tokens@1"] == 4.0
    assert rep["all"]["n"] == 6 and rep["all"]["n_no_evidence"] == 2
    assert rep["cat:1"]["tokens@2"] == 20.0  # tokens are averaged over all questions, evidence or not
    assert rep["cat:2"]["tokens@1"] == 10.0


def test_score_question_tokens_and_sessions():
    q = _qe("q", "1", ["a"], [["x"], ["a"]], tokens=[3, 5], sessions=(("s9",), ("s1",)), ev_sessions=["s1"])
    s = score_question(q, [1, 5])
    assert s["tokens@1"] == 3 and s["tokens@5"] == 8
    assert s["session_recall@1"] == 0.0 and s["session_recall@5"] == 1.0
    assert s["evidence_recall@5"] == 1.0 and s["ndcg@5"] == pytest.approx(lg(2))


def test_question_eval_counts_tokens_of_texts():
    qa = QAItem("q", "?", "a", "1", ["t1"], ["s1"], None, False, False, ["D1:1"])
    items = [RetrievedItem("hello world", ["t0"], 1.0), RetrievedItem("I went to Paris in May.", ["t1"], 0.5)]
    qe = question_eval(qa, items, turn_to_session={"t0": "s0", "t1": "s1"})
    assert qe.item_tokens == (count_tokens("hello world"), count_tokens("I went to Paris in May."))
    assert qe.retrieved == (("t0",), ("t1",)) and qe.retrieved_sessions == (("s0",), ("s1",))


# -- baselines ---------------------------------------------------------------------------------------------------

T0 = datetime(2024, 1, 1, 9, 0, tzinfo=UTC)


def _turns(user: str, texts: list[str], session: str = "s1") -> list[RawTurn]:
    return [
        RawTurn(
            turn_id=turn_id(user, session, i),
            user_id=user,
            session_id=session,
            seq=i,
            role="user" if i % 2 == 0 else "assistant",
            content=text,
            timestamp=T0 + timedelta(minutes=i),
        )
        for i, text in enumerate(texts)
    ]


DOCS = [
    "I adopted a cat named Luna last spring.",
    "We talked about the weather and the weekend.",
    "My sister is studying quantum chromodynamics in Geneva.",
    "The weather was rainy, the weather is always rainy.",
]


def test_tokenize():
    assert tokenize("The Cat's 2 cats, e-mail!") == ["cat", "s", "2", "cat", "e", "mail"]  # stop words out, stemmed


def test_bm25_exact_term_first():
    turns = _turns("u", DOCS)
    r = BM25Retriever()
    r.fit(turns)
    hits = r.retrieve("u", "what does her sister study? chromodynamics", 3)
    assert hits[0].source_turn_ids == [turns[2].turn_id]
    assert "[2024-01-01 09:02] user: My sister" in hits[0].text
    # only documents sharing a term are returned
    assert [h.source_turn_ids[0] for h in r.retrieve("u", "quantum", 10)] == [turns[2].turn_id]
    assert r.retrieve("u", "zebra", 10) == []
    # term frequency saturates but still counts: the doc saying "weather" three times ranks above the one saying it once
    w = r.retrieve("u", "weather", 10)
    assert [h.source_turn_ids[0] for h in w] == [turns[3].turn_id, turns[1].turn_id]
    assert w[0].score > w[1].score > 0


def test_bm25_matches_okapi_formula():
    turns = _turns("u", ["apple banana", "apple apple cherry date", "egg"])
    r = BM25Retriever(k1=1.5, b=0.75)
    r.fit(turns)
    # doc 1: user/assistant prefix words are indexed too ("user:", "assistant:") — lengths 3, 5, 2
    n, avgdl = 3, (3 + 5 + 2) / 3
    idf = math.log(1 + (n - 2 + 0.5) / (2 + 0.5))
    expect = idf * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 5 / avgdl))
    hits = r.retrieve("u", "apple", 5)
    assert hits[0].source_turn_ids == [turns[1].turn_id]
    assert hits[0].score == pytest.approx(expect)


def test_retrievers_isolate_users():
    r = BM25Retriever()
    r.fit(_turns("alice", ["alice likes tennis"]) + _turns("bob", ["bob likes tennis too"]))
    assert all(h.text.endswith("alice likes tennis") for h in r.retrieve("alice", "tennis", 5))
    with pytest.raises(UnknownUserError):
        r.retrieve("carol", "tennis", 5)


VOCAB = ["cat", "weather", "sister", "quantum", "rainy"]


def toy_embed(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), len(VOCAB) + 1), dtype=np.float32)
    for i, t in enumerate(texts):
        words = tokenize(t)
        for j, v in enumerate(VOCAB):
            out[i, j] = sum(w == tokenize(v)[0] for w in words)  # compared as stems
        out[i, -1] = 0.1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_naive_rag_toy_embed():
    turns = _turns("u", DOCS)
    r = NaiveRAGRetriever(toy_embed)
    r.fit(turns)
    hits = r.retrieve("u", "is it rainy weather", 2)
    assert [h.source_turn_ids[0] for h in hits] == [turns[3].turn_id, turns[1].turn_id]
    assert hits[0].score == pytest.approx(float(toy_embed(["is it rainy weather"])[0] @ toy_embed([DOCS[3]])[0]))
    assert len(r.retrieve("u", "cat", 10)) == 4  # dense retrieval always fills k
    assert r.retrieve("u", "cat", 1)[0].source_turn_ids == [turns[0].turn_id]


def test_naive_rag_prefetch_batches_queries():
    calls: list[int] = []

    def counting_embed(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return toy_embed(texts)

    turns = _turns("u", DOCS)
    qas = [
        QAItem(f"u:q{i}", q, None, "1", [turns[i].turn_id], ["s1"], None, False, False, [])
        for i, q in enumerate(["cat", "weather", "sister quantum"])
    ]
    r = NaiveRAGRetriever(counting_embed)
    r.fit(turns)
    qes = evaluate_retriever([Conversation("u", turns, qas, "test")], r, 1)
    assert calls == [4, 3]  # the history once, then all three questions in one batch
    assert [score_question(q, [1])["evidence_recall@1"] for q in qes] == [1.0, 1.0, 1.0]


def test_full_text_and_evaluate_retriever():
    turns = _turns("u", DOCS)
    qa = QAItem(
        "u:q0", "Where does the sister study?", "Geneva", "1", [turns[2].turn_id], ["s1"], None, False, False, ["D1:3"]
    )
    conv = Conversation(user_id="u", turns=turns, qa=[qa], source="test")
    full = FullTextRetriever()
    full.fit(turns)
    assert len(full.retrieve("u", "anything", 1)) == 4
    [qe] = evaluate_retriever([conv], full, 1)
    s = score_question(qe, [1])
    assert s["evidence_recall@1"] == 1.0 and s["session_recall@1"] == 1.0  # unbounded: k does not truncate
    history = sum(count_tokens(h.text) for h in full.retrieve("u", "", 1))
    assert s["tokens@1"] == history

    bm25 = BM25Retriever()
    bm25.fit(turns)
    [qe] = evaluate_retriever([conv], bm25, 3)
    rep = aggregate([qe], [1, 3])
    assert rep["cat:1"]["evidence_recall@1"] == 1.0 and rep["cat:1"]["ndcg@3"] == 1.0


def test_as_retrieved_adapts_pipeline_hits():
    class Rec:
        text = "Alice adopted a cat"
        source_turn_ids = ["t1", "t2"]

    class Hit:
        record = Rec()
        score = 0.7

    item = as_retrieved(Hit())
    assert item == RetrievedItem("Alice adopted a cat", ["t1", "t2"], 0.7)


def test_ask_hands_the_question_date_to_dated_retrievers_only():
    turns = _turns("u", DOCS)
    asked = datetime(2023, 5, 30, 21, 0, tzinfo=UTC)
    qas = [
        QAItem("u:q0", "cat two weeks ago?", None, "1", [turns[0].turn_id], ["s1"], asked, False, False, []),
        QAItem("u:q1", "cat?", None, "1", [turns[0].turn_id], ["s1"], None, False, False, []),
    ]
    conv = Conversation("u", turns, qas, "test")

    class Dated:
        dated = True

        def __init__(self) -> None:
            self.seen: list[datetime | None] = []

        def retrieve(self, user_id: str, query: str, k: int, as_of: datetime | None = None) -> list[RetrievedItem]:
            self.seen.append(as_of)
            return [RetrievedItem("t", [turns[0].turn_id], 1.0)]

    dated = Dated()
    assert [score_question(q, [1])["evidence_recall@1"] for q in evaluate_retriever([conv], dated, 1)] == [1.0, 1.0]
    assert dated.seen == [asked, None]
    bm25 = BM25Retriever()  # no ``as_of`` parameter: it must not be handed one
    bm25.fit(turns)
    assert len(evaluate_retriever([conv], bm25, 1)) == 2
