"""Loaders: counts on the real dev split, evidence mapping, malformed evidence, time, and the JSONL format."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from streams.ids import turn_id
from streams.loaders import (
    iter_turns,
    load_jsonl,
    load_locomo,
    load_longmemeval,
    parse_locomo_datetime,
    parse_longmemeval_datetime,
)

DATA = Path("/work/shared/data")
LOCOMO = DATA / "locomo10_dev.json"
LME_S = DATA / "longmemeval_s_dev.json"
LME_ORACLE = DATA / "longmemeval_oracle_dev.json"

needs_data = pytest.mark.skipif(not LOCOMO.exists(), reason="dev split not present")


@pytest.fixture(scope="module")
def locomo():
    return load_locomo(LOCOMO)


@pytest.fixture(scope="module")
def lme_s():
    return load_longmemeval(LME_S)


@pytest.fixture(scope="module")
def lme_oracle():
    return load_longmemeval(LME_ORACLE)


# -- LoCoMo on the real file -------------------------------------------------------------------------------------


@needs_data
def test_locomo_counts(locomo):
    assert [c.user_id for c in locomo] == ["conv-26", "conv-30", "conv-41", "conv-42", "conv-43"]
    assert all(c.source == "locomo" for c in locomo)
    assert sum(len(c.turns) for c in locomo) == 2760
    assert sum(len(c.qa) for c in locomo) == 999
    assert [len(c.turns) for c in locomo] == [419, 369, 663, 629, 680]
    assert sum(c.meta["sessions"] for c in locomo) == 128
    cats = Counter(q.category for c in locomo for q in c.qa)
    assert cats == {"1": 142, "2": 156, "3": 46, "4": 418, "5": 237}
    assert sum(q.is_adversarial for c in locomo for q in c.qa) == 237
    assert not any(q.is_abstention for c in locomo for q in c.qa)
    assert sum("[shares a photo: " in t.content for t in iter_turns(locomo)) == 602


@needs_data
def test_locomo_turn_fields(locomo):
    conv = locomo[0]
    first = conv.turns[0]
    assert first.session_id == "session_1" and first.seq == 0 and first.source_id == "D1:1"
    assert first.role == first.speaker == "Caroline"
    assert first.turn_id == turn_id("conv-26", "session_1", 0)
    # session_1_date_time is "1:56 pm on 8 May, 2023"
    assert first.timestamp == datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    assert conv.turns[1].timestamp == first.timestamp + timedelta(seconds=1)
    ids = [t.turn_id for t in iter_turns(locomo)]
    assert len(ids) == len(set(ids))


@needs_data
def test_locomo_timestamps_aware_and_strictly_increasing(locomo):
    for conv in locomo:
        by_session: dict[str, list] = {}
        for t in conv.turns:
            assert t.timestamp.tzinfo is not None and t.timestamp.utcoffset() == timedelta(0)
            by_session.setdefault(t.session_id, []).append(t)
        for turns in by_session.values():
            assert [t.seq for t in turns] == list(range(len(turns)))
            assert all(a.timestamp < b.timestamp for a, b in zip(turns, turns[1:], strict=False))
        # sessions are chronological in this split, so the whole list is too
        assert all(a.timestamp < b.timestamp for a, b in zip(conv.turns, conv.turns[1:], strict=False))


@needs_data
def test_locomo_evidence_maps_to_source_ids(locomo):
    conv = locomo[0]
    q = conv.qa[0]
    assert q.question == "When did Caroline go to the LGBTQ support group?"
    assert q.raw_evidence == ["D1:3"]
    by_id = {t.turn_id: t for t in conv.turns}
    assert [by_id[t].source_id for t in q.evidence_turn_ids] == ["D1:3"]
    assert q.evidence_session_ids == ["session_1"]
    # every well-formed evidence entry maps to the turn with that dia_id
    for c in locomo:
        by_id = {t.turn_id: t for t in c.turns}
        for qa in c.qa:
            for tid in qa.evidence_turn_ids:
                assert tid in by_id
            mapped = {by_id[t].source_id for t in qa.evidence_turn_ids}
            for raw in qa.raw_evidence:
                if raw in {t.source_id for t in c.turns}:
                    assert raw in mapped


@needs_data
def test_locomo_malformed_evidence_counted(locomo):
    meta = {c.user_id: c.meta for c in locomo}
    assert sum(m["evidence_repaired"] for m in meta.values()) == 3  # 'D8:6; D9:17' (2 ids), 'D:11:26'
    assert sum(m["evidence_dropped"] for m in meta.values()) == 2  # 'D10:19' (no such turn), 'D'
    assert sum(m["qa_empty_evidence"] for m in meta.values()) == 2
    assert meta["conv-26"]["session_dates_without_session"] == 16

    conv26 = locomo[0]
    q = next(q for q in conv26.qa if q.raw_evidence == ["D8:6; D9:17"])
    by_id = {t.turn_id: t for t in conv26.turns}
    assert [by_id[t].source_id for t in q.evidence_turn_ids] == ["D8:6", "D9:17"]
    assert q.evidence_session_ids == ["session_8", "session_9"]

    conv43 = locomo[4]
    q = next(q for q in conv43.qa if "D:11:26" in q.raw_evidence)
    by_id = {t.turn_id: t for t in conv43.turns}
    assert "D11:26" in {by_id[t].source_id for t in q.evidence_turn_ids}

    empties = [q for c in locomo for q in c.qa if not q.evidence_turn_ids]
    assert len(empties) == 2 and all(q.evidence_session_ids == [] for q in empties)


@needs_data
def test_locomo_answers(locomo):
    qas = [q for c in locomo for q in c.qa]
    assert qas[1].answer == "2022"  # int in the file
    assert all(q.answer is None or isinstance(q.answer, str) for q in qas)
    adv = [q for q in qas if q.is_adversarial]
    assert all(q.adversarial_answer for q in adv)
    assert sum(q.answer is not None for q in adv) == 2


# -- LoCoMo on a synthetic file: every kind of malformed evidence ----------------------------------------------


def _write(tmp_path: Path, name: str, data) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data), encoding="utf-8")
    return p


def test_locomo_repairs_and_drops(tmp_path):
    session = [{"speaker": "A" if i % 2 == 0 else "B", "dia_id": f"D30:{i + 1}", "text": f"t{i}"} for i in range(6)]
    session[1]["blip_caption"] = "a photo of a dog"
    sample = {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "A",
            "speaker_b": "B",
            "session_30_date_time": "10:05 am on 3 January, 2024",
            "session_30": session,
        },
        "qa": [
            {"question": "q0", "answer": 7, "evidence": ["D30:05"], "category": 2},
            {"question": "q1", "answer": "a", "evidence": ["D30:1; D30:2", "D30:2"], "category": 1},
            {"question": "q2", "answer": "b", "evidence": ["D:30:3", "D30:99", "D", "garbage"], "category": 4},
            {"question": "q3", "adversarial_answer": "c", "evidence": [], "category": 5},
        ],
    }
    [conv] = load_locomo(_write(tmp_path, "l.json", [sample]))
    src = {t.turn_id: t.source_id for t in conv.turns}
    q0, q1, q2, q3 = conv.qa
    assert [src[t] for t in q0.evidence_turn_ids] == ["D30:5"] and q0.answer == "7"
    assert [src[t] for t in q1.evidence_turn_ids] == ["D30:1", "D30:2"]  # duplicate not repeated
    assert [src[t] for t in q2.evidence_turn_ids] == ["D30:3"]
    assert q3.evidence_turn_ids == [] and q3.answer is None and q3.is_adversarial and q3.adversarial_answer == "c"
    assert conv.meta["evidence_dropped"] == 3
    assert conv.meta["evidence_repaired"] == 4  # D30:05, the two halves of 'D30:1; D30:2', D:30:3
    assert conv.meta["qa_empty_evidence"] == 1
    assert len(conv.meta["warnings"]) == 7
    assert conv.turns[1].content == "t1 [shares a photo: a photo of a dog]"
    assert conv.turns[0].timestamp == datetime(2024, 1, 3, 10, 5, tzinfo=UTC)
    assert conv.turns[5].timestamp == datetime(2024, 1, 3, 10, 5, 5, tzinfo=UTC)


def test_parse_dates():
    assert parse_locomo_datetime("1:56 pm on 8 May, 2023") == datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    assert parse_locomo_datetime("12:09 am on 13 September, 2023") == datetime(2023, 9, 13, 0, 9, tzinfo=UTC)
    assert parse_locomo_datetime("12:30 pm on 1 June, 2023") == datetime(2023, 6, 1, 12, 30, tzinfo=UTC)
    assert parse_longmemeval_datetime("2023/05/20 (Sat) 02:21") == datetime(2023, 5, 20, 2, 21, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_locomo_datetime("May 8 2023")
    with pytest.raises(ValueError):
        parse_longmemeval_datetime("2023-05-20 02:21")


# -- LongMemEval -------------------------------------------------------------------------------------------------


@needs_data
def test_longmemeval_s_counts(lme_s):
    assert len(lme_s) == 60
    assert all(len(c.qa) == 1 and c.source == "longmemeval" for c in lme_s)
    assert sum(len(c.turns) for c in lme_s) == 29266
    assert sum(c.meta["sessions"] for c in lme_s) == 2838
    assert sum(len(c.qa[0].evidence_turn_ids) for c in lme_s) == 100
    assert sum(c.qa[0].is_abstention for c in lme_s) == 4
    assert Counter(c.qa[0].category for c in lme_s) == {
        "knowledge-update": 10,
        "multi-session": 15,
        "single-session-assistant": 7,
        "single-session-preference": 3,
        "single-session-user": 9,
        "temporal-reasoning": 16,
    }
    # one haystack repeats a session id; its second copy is renamed, so turn ids stay unique
    dups = [(c.user_id, c.meta["duplicate_session_ids"]) for c in lme_s if c.meta["duplicate_session_ids"]]
    assert dups == [("lme-gpt4_c27434e8_abs", ["8c64ce26_3#2"])]
    for c in lme_s:
        ids = [t.turn_id for t in c.turns]
        assert len(ids) == len(set(ids))


@needs_data
def test_longmemeval_fields(lme_s):
    c = lme_s[0]
    q = c.qa[0]
    assert c.user_id == "lme-01493427" and q.question_id == "01493427"
    assert q.question_date == datetime(2023, 12, 21, 21, 31, tzinfo=UTC)
    assert q.evidence_session_ids == ["answer_a7b44747_1", "answer_a7b44747_2"] == q.raw_evidence
    first = c.turns[0]
    assert first.session_id == "answer_a7b44747_1" and first.source_id == "answer_a7b44747_1:0"
    assert first.role == "user" and c.turns[1].role == "assistant"
    assert first.timestamp == datetime(2023, 8, 11, 15, 58, tzinfo=UTC)
    by_id = {t.turn_id: t for t in c.turns}
    assert all(by_id[t].session_id in q.evidence_session_ids for t in q.evidence_turn_ids)
    assert sum(c.qa[0].answer is not None and c.qa[0].answer.isdigit() for c in lme_s) >= 5  # ints → str
    assert all(isinstance(c.qa[0].answer, str) for c in lme_s)
    for conv in lme_s:
        for t in conv.turns:
            assert t.timestamp.tzinfo is not None


@needs_data
def test_longmemeval_oracle_uses_own_dates(lme_s, lme_oracle):
    assert len(lme_oracle) == 60
    assert sum(len(c.turns) for c in lme_oracle) == 1225
    assert sum(len(c.qa[0].evidence_turn_ids) for c in lme_oracle) == 100
    assert [c.user_id for c in lme_oracle] == [c.user_id for c in lme_s]
    # same evidence text, but each variant keeps its own dates
    assert any(a.qa[0].question_date != b.qa[0].question_date for a, b in zip(lme_s, lme_oracle, strict=True))
    for s, o in zip(lme_s, lme_oracle, strict=True):
        st = {t.turn_id: t for t in s.turns}
        ot = {t.turn_id: t for t in o.turns}
        # (oracle sessions come in another order, but a turn's id is the same: same user, session, seq)
        assert sorted(s.qa[0].evidence_turn_ids) == sorted(o.qa[0].evidence_turn_ids)
        assert all(st[t].content == ot[t].content for t in s.qa[0].evidence_turn_ids)


def test_longmemeval_synthetic(tmp_path):
    rec = {
        "question_id": "abc_abs",
        "question_type": "temporal-reasoning",
        "question": "When?",
        "question_date": "2023/05/21 (Sun) 08:00",
        "answer": 3,
        "answer_session_ids": ["s2"],
        "haystack_dates": ["2023/05/20 (Sat) 10:00", "2023/05/20 (Sat) 09:00"],  # out of order within the day
        "haystack_session_ids": ["s1", "s2"],
        "haystack_sessions": [
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            [{"role": "user", "content": "I did X", "has_answer": True}, {"role": "assistant", "content": "ok"}],
        ],
    }
    [c] = load_longmemeval(_write(tmp_path, "lme.json", [rec]))
    q = c.qa[0]
    assert q.answer == "3" and q.is_abstention and not q.is_adversarial
    assert [t.source_id for t in c.turns] == ["s1:0", "s1:1", "s2:0", "s2:1"]
    assert q.evidence_turn_ids == [turn_id("lme-abc_abs", "s2", 0)]
    assert c.turns[2].timestamp == datetime(2023, 5, 20, 9, 0, tzinfo=UTC)  # as given, not reordered
    assert c.turns[1].timestamp == datetime(2023, 5, 20, 10, 0, 1, tzinfo=UTC)


# -- JSONL -------------------------------------------------------------------------------------------------------


def _jsonl(tmp_path: Path, lines: list) -> Path:
    p = tmp_path / "turns.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return p


def _line(**kw):
    base = {
        "user_id": "u1",
        "session_id": "s1",
        "role": "user",
        "content": "hello",
        "timestamp": "2024-01-01T10:00:00+00:00",
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_jsonl_ok(tmp_path):
    p = _jsonl(
        tmp_path,
        [
            _line(),
            "",
            _line(role="assistant", content="hi", timestamp="2024-01-01T10:00:01Z", speaker="bot"),
            _line(session_id="s2", seq=5, timestamp="2024-01-01T12:00:00+02:00", source_id="x:1"),
            _line(session_id="s2", timestamp="2024-01-01T12:00:01+02:00"),
        ],
    )
    turns = load_jsonl(p)
    assert [(t.session_id, t.seq) for t in turns] == [("s1", 0), ("s1", 1), ("s2", 5), ("s2", 6)]
    assert turns[0].turn_id == turn_id("u1", "s1", 0)
    assert turns[1].speaker == "bot" and turns[2].source_id == "x:1"
    assert turns[2].timestamp == datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
    assert all(t.timestamp.tzinfo is not None for t in turns)


def test_jsonl_default_user(tmp_path):
    p = _jsonl(tmp_path, [_line(user_id=None)])
    assert load_jsonl(p, default_user="me")[0].user_id == "me"
    with pytest.raises(ValueError, match=r":1: missing field\(s\) \['user_id'\]"):
        load_jsonl(p)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"user_id": "u1", oops', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_line(timestamp="2024-01-01T10:00:00"), "no timezone offset"),
        (_line(timestamp="yesterday"), "not ISO 8601"),
        (_line(timestamp=1704103200), "ISO 8601 string"),
        (_line(content=None), r"missing field\(s\) \['content'\]"),
        (_line(role=""), "invalid turn"),
        (_line(seq=-1), "invalid turn"),
        (_line(seq="3"), "seq must be an integer"),
        (_line(content=5), "content must be a string"),
        (_line(colour="red"), "unknown field"),
        (_line(seq=0), "duplicate turn"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, bad, reason):
    p = _jsonl(tmp_path, [_line(), bad])
    with pytest.raises(ValueError, match=reason) as exc:
        load_jsonl(p)
    assert f"{p}:2:" in str(exc.value)


def test_locomo_evidence_entry_holding_several_ids_is_split(tmp_path):
    sample = {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "Ann",
            "speaker_b": "Bo",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a puppy."},
                {"speaker": "Bo", "dia_id": "D1:2", "text": "What is its name?"},
                {"speaker": "Ann", "dia_id": "D1:3", "text": "Max, after my grandfather."},
            ],
        },
        "qa": [{"question": "What is the puppy called?", "answer": "Max", "evidence": ["D1:1 D1:3"], "category": 4}],
    }
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps([sample]))
    (conv,) = load_locomo(path)
    (q,) = conv.qa
    by_id = {t.turn_id: t for t in conv.turns}
    assert [by_id[t].source_id for t in q.evidence_turn_ids] == ["D1:1", "D1:3"]
    assert conv.meta["evidence_dropped"] == 0
