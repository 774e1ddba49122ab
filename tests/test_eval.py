"""``lightmem eval``: LightMem Streams against raw-turn baselines on a tiny hand-made conversation.

Fast tests use the model-free systems (FullText, BM25); tests that run the real pipeline (encoder, compressor,
segmenter, store) are marked slow, as is the CLI run on a slice of the LoCoMo dev file.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas.records import RawTurn
from streams import ids
from streams.eval import run as eval_run
from streams.eval import systems as eval_systems
from streams.eval.judge import JudgeUnavailable, judge_messages, parse_verdict, rubric_for
from streams.eval.run import (
    CHECKPOINT,
    EvalError,
    EvalOptions,
    decode_questions,
    encode_questions,
    run_eval,
)
from streams.loaders import Conversation, QAItem
from streams.settings import Settings, STMSettings, StoreSettings
from tests.fixtures_llm import llm_settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
USER = "tiny-1"
SESSIONS = {
    "s1": [
        ("Alice", "Hi Bob! I just got back from my trip to Lisbon, it was wonderful."),
        ("Bob", "Welcome back Alice. What did you enjoy most in Lisbon?"),
        ("Alice", "The tiled buildings and the custard tarts called pasteis de nata were amazing."),
        ("Bob", "I have been training for the city marathon, it is in October."),
        ("Alice", "That is impressive. How many kilometres do you run each week?"),
        ("Bob", "About forty kilometres, mostly early in the morning before work."),
        ("Alice", "My sister Clara is visiting next month with her two kids."),
        ("Bob", "Nice, say hello to Clara from me."),
    ],
    "s2": [
        ("Bob", "I adopted a dog from the shelter last weekend, a beagle named Pepper."),
        ("Alice", "Pepper is a lovely name! How old is she?"),
        ("Bob", "She is three years old and loves chasing squirrels in the park."),
        ("Alice", "I started learning the cello, my teacher says I practise too little."),
        ("Bob", "How often do you practise the cello?"),
        ("Alice", "Only twice a week, I should do more."),
        ("Bob", "The marathon got moved to November because of the roadworks."),
        ("Alice", "Good luck with the training, and give Pepper a treat from me."),
    ],
}


def tiny_conversation(user: str = USER) -> Conversation:
    turns: list[RawTurn] = []
    start = {"s1": datetime(2024, 3, 2, 10, 0, tzinfo=UTC), "s2": datetime(2024, 3, 20, 18, 30, tzinfo=UTC)}
    for sid, lines in SESSIONS.items():
        for seq, (speaker, text) in enumerate(lines):
            turns.append(
                RawTurn(
                    turn_id=ids.turn_id(user, sid, seq),
                    user_id=user,
                    session_id=sid,
                    seq=seq,
                    role=speaker,
                    speaker=speaker,
                    content=text,
                    timestamp=start[sid] + timedelta(minutes=seq),
                    source_id=f"{sid}:{seq}",
                )
            )
    by = {(t.session_id, t.seq): t for t in turns}

    def qa(i: int, q: str, a: str | None, cat: str, ev: list[tuple[str, int]], adversarial: bool = False) -> QAItem:
        ev_turns = [by[e] for e in ev]
        return QAItem(
            question_id=f"{user}:q{i}",
            question=q,
            answer=a,
            category=cat,
            evidence_turn_ids=[t.turn_id for t in ev_turns],
            evidence_session_ids=list(dict.fromkeys(t.session_id for t in ev_turns)),
            question_date=None,
            is_abstention=False,
            is_adversarial=adversarial,
            raw_evidence=[f"{s}:{n}" for s, n in ev],
            adversarial_answer="a cat" if adversarial else None,
        )

    questions = [
        qa(0, "Which city did Alice travel to?", "Lisbon", "4", [("s1", 0)]),
        qa(1, "What is the name of Bob's dog?", "Pepper", "4", [("s2", 0)]),
        qa(2, "When is Bob's marathon now?", "November", "1", [("s1", 3), ("s2", 6)]),
        qa(3, "What instrument is Alice learning?", "the cello", "2", [("s2", 3)]),
        qa(4, "What pet did Clara adopt?", None, "5", [("s2", 0)], adversarial=True),
        qa(5, "What is Alice's favourite colour?", "unknown", "3", []),
    ]
    return Conversation(user_id=user, turns=turns, qa=questions, source="locomo", meta={})


def make_settings(tmp_path: Path, **kw) -> Settings:  # noqa: ANN003
    return Settings(
        data_dir=tmp_path / "state",
        store=StoreSettings(path=tmp_path / "user-store"),
        stm=STMSettings(threshold_tokens=128),
        **kw,
    )


def options(out: Path, **kw) -> EvalOptions:  # noqa: ANN003
    values = {"benchmark": "locomo", "data": None, "out": out, "ks": (1, 3, 5), "show_progress": False}
    values.update(kw)
    return EvalOptions(**values)


def _metric_values(results: dict) -> list[float]:
    vals = []
    for s in results["systems"]:
        for group in s["metrics"].values():
            for name, v in group.items():
                if name.split("@")[0] in ("evidence_recall", "recall_all", "ndcg", "session_recall") and v is not None:
                    vals.append(v)
    return vals


def _system(results: dict, name: str) -> dict:
    return next(s for s in results["systems"] if s["system"] == name)


# -- fast: no model --------------------------------------------------------------------------------------------


def test_model_free_systems_score_and_resume(tmp_path, monkeypatch):
    conv = tiny_conversation()
    settings = make_settings(tmp_path)
    opts = options(tmp_path / "out", systems=("fulltext", "bm25"), plots=False)
    res = run_eval(opts, settings, conversations=[conv])
    assert [s["system"] for s in res["systems"]] == ["fulltext", "bm25"]
    ft = _system(res, "fulltext")["metrics"]
    for k in (1, 3, 5):
        assert ft["overall"][f"evidence_recall@{k}"] == 1.0 and ft["overall"][f"recall_all@{k}"] == 1.0
        # the whole history, as a reader gets it (time and speaker added), whatever k is
        assert ft["overall"][f"tokens@{k}"] > res["dataset"]["history_tokens"]
    assert ft["adversarial"]["n"] == 1 and ft["overall"]["n_no_evidence"] == 1
    assert all(0.0 <= v <= 1.0 for v in _metric_values(res))
    assert not res["run"]["model_load_s"]  # no model was needed
    lines = (opts.out / CHECKPOINT).read_text().splitlines()
    assert len(lines) == 3  # header + one eval record per system

    # rerun on the same out dir: everything comes from the checkpoint, nothing is recomputed
    monkeypatch.setattr(eval_systems, "FullTextRetriever", None)
    monkeypatch.setattr(eval_systems, "BM25Retriever", None)
    res2 = run_eval(opts, settings, conversations=[conv])
    assert (opts.out / CHECKPOINT).read_text().splitlines() == lines
    assert res2["run"]["reused_units"] == 2 and res2["run"]["evaluated_units"] == 0
    assert [s["metrics"] for s in res2["systems"]] == [s["metrics"] for s in res["systems"]]


def test_resume_refuses_other_data(tmp_path):
    settings = make_settings(tmp_path)
    opts = options(tmp_path / "out", systems=("bm25",), plots=False)
    run_eval(opts, settings, conversations=[tiny_conversation()])
    with pytest.raises(EvalError, match="another --out"):
        run_eval(opts, settings, conversations=[tiny_conversation("tiny-2")])


def test_checkpoint_encoding_roundtrip():
    from streams.eval.baselines import BM25Retriever, FullTextRetriever
    from streams.eval.metrics import question_eval

    conv = tiny_conversation()
    for retriever, unbounded in ((BM25Retriever(), False), (FullTextRetriever(), True)):
        retriever.fit(conv.turns)
        t2s = {t.turn_id: t.session_id for t in conv.turns}
        qes = [
            question_eval(qa, retriever.retrieve(USER, qa.question, 5), turn_to_session=t2s, unbounded=unbounded)
            for qa in conv.qa
        ]
        enc = json.loads(json.dumps(encode_questions(qes, conv)))
        assert (enc["shared"] is not None) == unbounded
        assert decode_questions(enc, conv) == qes


def test_judge_without_endpoint_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(JudgeUnavailable, match="LIGHTMEM_LLM__BASE_URL"):
        run_eval(options(tmp_path / "out", judge=True), make_settings(tmp_path), conversations=[tiny_conversation()])

    from streams.cli import app

    monkeypatch.delenv("LIGHTMEM_LLM__BASE_URL", raising=False)
    data = tmp_path / "tiny.json"
    data.write_text("[]")
    result = CliRunner().invoke(
        app,
        ["eval", "locomo", "--data", str(data), "--judge", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "LIGHTMEM_LLM__BASE_URL" in result.output


def test_judge_prompts_and_verdicts():
    assert parse_verdict("Yes.") is True and parse_verdict("no") is False and parse_verdict("maybe") is None
    assert "off by one" in rubric_for("temporal-reasoning")
    assert rubric_for("x", is_abstention=True) != rubric_for("x")
    msg = judge_messages("Q?", None, "I don't know", "5", is_adversarial=True, wrong_answer="a cat")[0]["content"]
    assert "Known wrong answer: a cat" in msg and "unanswerable" in msg and msg.rstrip().endswith("yes or no.")


# -- the real pipeline -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_all_systems_offline_then_resume_without_rebuilding(tmp_path, encoder, monkeypatch):
    from streams.stages import Stages

    conv = tiny_conversation()
    settings = make_settings(tmp_path)
    stages = Stages(settings, encoder=encoder)
    opts = options(tmp_path / "out")
    res = run_eval(opts, settings, stages=stages, conversations=[conv])

    assert [s["system"] for s in res["systems"]] == ["fulltext", "naiverag", "bm25", "lightmem"]
    assert all(0.0 <= v <= 1.0 for v in _metric_values(res))
    assert _system(res, "fulltext")["metrics"]["overall"]["evidence_recall@1"] == 1.0
    lm = _system(res, "lightmem")
    assert set(lm["cost"]) >= {"compression", "segmentation", "extraction", "embedding", "upsert", "search"}
    assert lm["llm"]["calls"] == 0 and lm["cost"]["extraction"]["calls"] == 0  # extractive mode
    assert lm["cost"]["compression"]["items"] == len(conv.turns)
    assert 0 < lm["compression"]["ratio"] <= 1 and lm["memories"] > 0 and lm["dead_letters"] == 0
    assert lm["metrics"]["overall"]["evidence_recall@5"] > 0
    assert res["models"]["extractor_loaded"] == "extractive" and res["versions"]["torch"]
    # the eval's store lives in the out dir; the user's store is untouched
    assert (opts.out / "store").exists() and not (tmp_path / "user-store").exists()

    # outputs
    for name in ("results.json", "report.md", "recall_at_k.png", "cost_per_stage.png"):
        assert (opts.out / name).exists(), name
    for name in ("recall_at_k.png", "cost_per_stage.png"):
        assert (opts.out / name).read_bytes()[:8] == PNG_MAGIC
    on_disk = json.loads((opts.out / "results.json").read_text())
    assert on_disk["systems"][3]["metrics"] == json.loads(json.dumps(lm["metrics"]))
    report = (opts.out / "report.md").read_text()
    assert all(label in report for label in ("FullText", "NaiveRAG", "BM25", "LightMem Streams"))

    # rerun on the same out dir: nothing is ingested, no Memory is opened, no model is loaded
    lines = (opts.out / CHECKPOINT).read_text().splitlines()

    def forbidden(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("resumed run must not build this")

    monkeypatch.setattr(eval_systems, "Memory", forbidden)
    monkeypatch.setattr(eval_run, "Stages", forbidden)
    res2 = run_eval(opts, settings, conversations=[conv])
    assert (opts.out / CHECKPOINT).read_text().splitlines() == lines
    assert res2["run"]["ingested_users"] == 0 and res2["run"]["memories_opened"] == 0
    assert res2["run"]["reused_units"] == 4
    assert _system(res2, "lightmem")["metrics"] == lm["metrics"]

    # an eval record lost after the ingest record: the user is searched again, not re-ingested
    monkeypatch.undo()
    kept = [ln for ln in lines if not ('"kind": "eval"' in ln and '"system": "lightmem"' in ln)]
    (opts.out / CHECKPOINT).write_text("\n".join(kept) + "\n")
    added: list[int] = []
    real_add = eval_systems.Memory.add_turns
    monkeypatch.setattr(eval_systems.Memory, "add_turns", lambda self, t: added.append(len(t)) or real_add(self, t))
    res3 = run_eval(opts, settings, stages=stages, conversations=[conv])
    assert added == [] and res3["run"]["ingested_users"] == 0 and res3["run"]["evaluated_units"] == 1
    assert _system(res3, "lightmem")["metrics"] == lm["metrics"]


@pytest.mark.slow
def test_grid_through_the_llm_server_with_judge(tmp_path, encoder, llm):
    from streams.stages import Stages

    def judge_responder(messages):  # noqa: ANN001, ANN202
        text = messages[-1]["content"]
        if "Reply with exactly one word: yes or no." in text:
            return "yes" if "Response: " in text and "know" not in text.split("Response: ")[1][:40] else "no"
        if text.startswith("Retrieved notes:"):
            return "It was Lisbon."
        return None

    llm.register(judge_responder)
    conv = tiny_conversation()
    settings = make_settings(tmp_path, llm=llm_settings(llm))
    stages = Stages(settings, encoder=encoder)
    opts = options(
        tmp_path / "out", systems=("bm25", "lightmem"), rates=(0.5, 0.8), thresholds=(64, 256), judge=True, judge_k=3
    )
    res = run_eval(opts, settings, stages=stages, conversations=[conv])

    cells = [s for s in res["systems"] if s["system"] == "lightmem"]
    assert [c["config"] for c in cells] == ["r0.5-t64", "r0.5-t256", "r0.8-t64", "r0.8-t256"]
    extraction_calls = sum(c["cost"]["extraction"]["calls"] for c in cells)
    judge_calls = sum(s["judge"]["cost"]["calls"] for s in res["systems"])
    assert extraction_calls > 0 and judge_calls == 2 * len(conv.qa) * len(res["systems"])
    assert len(llm.requests) == extraction_calls + judge_calls  # every call counted, none hidden
    for c in cells:
        assert c["llm"]["calls"] == c["cost"]["extraction"]["calls"]
        assert c["cost"]["extraction"]["input_tokens"] > 0 and c["cost"]["extraction"]["output_tokens"] > 0
        assert c["dead_letters"] == 0 and 0 < c["compression"]["ratio"] <= 1
    # a smaller STM threshold flushes more often: more extraction calls
    by = {c["config"]: c for c in cells}
    assert by["r0.5-t64"]["cost"]["extraction"]["calls"] > by["r0.5-t256"]["cost"]["extraction"]["calls"]
    # a lower rate keeps fewer tokens
    assert by["r0.5-t64"]["compression"]["ratio"] < by["r0.8-t64"]["compression"]["ratio"]
    for s in res["systems"]:
        j = s["judge"]["by_group"]["all"]
        assert j["n"] == len(conv.qa) and j["ungraded"] == 0 and 0 <= j["accuracy"] <= 1
    assert all(0.0 <= v <= 1.0 for v in _metric_values(res))
    assert (opts.out / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC
    assert "LLM-judge accuracy" in (opts.out / "report.md").read_text()


def _locomo_slice(path: Path) -> Path:
    """conv-26, its first two sessions only, with the questions whose evidence lies in them."""
    from tests.conftest import LOCOMO_DEV

    sample = json.loads(LOCOMO_DEV.read_text())[0]
    conv = {k: v for k, v in sample["conversation"].items() if not k.startswith("session_")}
    for n in (1, 2):
        conv[f"session_{n}"] = sample["conversation"][f"session_{n}"]
        conv[f"session_{n}_date_time"] = sample["conversation"][f"session_{n}_date_time"]
    qa = [
        q for q in sample["qa"] if q.get("evidence") and all(str(e).startswith(("D1:", "D2:")) for e in q["evidence"])
    ]
    path.write_text(json.dumps([{**sample, "conversation": conv, "qa": qa}]))
    return path


@pytest.mark.slow
def test_cli_eval_on_a_locomo_slice(tmp_path, monkeypatch):
    from streams.cli import app

    monkeypatch.delenv("LIGHTMEM_LLM__BASE_URL", raising=False)
    data = _locomo_slice(tmp_path / "slice.json")
    out = tmp_path / "out"
    args = ["eval", "locomo", "--data", str(data), "--limit", "1", "--k", "5,10", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    for label in ("FullText", "NaiveRAG", "BM25", "LightMem Streams"):
        assert label in result.output
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["sha256"] and res["config"]["ks"] == [5, 10]
    assert (out / "recall_at_k.png").read_bytes()[:8] == PNG_MAGIC
    again = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "state")])
    assert again.exit_code == 0 and json.loads((out / "results.json").read_text())["run"]["ingested_users"] == 0


@pytest.mark.slow
def test_recall_before_and_after_the_sleep_time_update(tmp_path, encoder):
    from streams.settings import SleepSettings
    from streams.stages import Stages

    conv = tiny_conversation()
    # a loose offline duplicate rule, so the sleep-time update really merges and deletes memories here
    from streams.settings import SegmentationSettings

    settings = Settings(
        data_dir=tmp_path / "state",
        store=StoreSettings(path=tmp_path / "user-store"),
        segmentation=SegmentationSettings(buffer_tokens=32),  # small buffers and batches: memories stored
        stm=STMSettings(threshold_tokens=16),  # over several flushes, so later ones have earlier neighbours
        sleep=SleepSettings(duplicate_threshold=0.3, similarity_threshold=0.3),
    )
    # small ingest chunks: batches stored at different times, so later memories have earlier ones to compare with
    opts = options(tmp_path / "out", systems=["lightmem"], compact=True, plots=False, chunk_turns=2)
    res = run_eval(opts, settings, stages=Stages(settings, encoder=encoder), conversations=[conv])

    before, after = res["systems"]
    assert before["config"] + "+sleep" == after["config"]
    assert "compaction" in after["cost"] and "compaction" not in before["cost"]
    assert after["memories"] < before["memories"]  # the update deleted superseded memories
    # ... without losing evidence: a deleted memory's source turns live on in the one that superseded it
    for k in opts.ks:
        key = f"evidence_recall@{k}"
        assert after["metrics"]["overall"][key] is not None and 0.0 <= after["metrics"]["overall"][key] <= 1.0
    assert [g["id"] for g in res["config"]["grid"]] == [before["config"]]


def test_credits_of_one_ranking():
    from streams.eval.metrics import QuestionEval, evidence_recall_at_k
    from streams.eval.results import _credited

    q = QuestionEval(
        question_id="q",
        category="4",
        is_abstention=False,
        is_adversarial=False,
        evidence_turn_ids=("t1", "t3", "t5"),
        evidence_session_ids=(),
        retrieved=(("t1",), ("t2",)),  # a fact stating t1, a summary whose sentences cite t2
        item_tokens=(5, 9),
        extra={"kinds": ["fact", "summary"], "batch": (("t1", "t2", "t3"), ("t2", "t3", "t5"))},
    )
    honest = evidence_recall_at_k(q.retrieved, q.evidence_turn_ids, 2)
    facts = _credited(q, "facts")
    batch = _credited(q, "batch")
    assert honest == pytest.approx(1 / 3)
    assert facts.retrieved == (("t1",), ())  # summaries credited with nothing
    assert batch.retrieved == (("t1",), ("t2", "t3", "t5"))  # only the summary takes its batch's turns
    assert evidence_recall_at_k(batch.retrieved, q.evidence_turn_ids, 2) == 1.0
