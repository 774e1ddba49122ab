"""Dataset loaders: LoCoMo, LongMemEval and our own JSONL ingest format, all into ``RawTurn`` records.

Every turn id comes from ``streams.ids.turn_id(user_id, session_id, seq)``, so loading the same file twice
yields the same ids, and benchmark evidence (LoCoMo ``dia_id`` / LongMemEval ``has_answer``) is mapped to those
turn ids for recall measurement.

Benchmark dates carry no timezone; they are read as UTC (the benchmarks' clocks are only used for ordering and
for the dates shown to the model). Our own JSONL format must carry an offset: a naive timestamp is an error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.records import RawTurn
from streams.ids import turn_id
from streams.text import MONTHS

log = logging.getLogger(__name__)

__all__ = [
    "Conversation",
    "QAItem",
    "iter_turns",
    "load_jsonl",
    "load_locomo",
    "load_longmemeval",
    "parse_locomo_datetime",
    "parse_longmemeval_datetime",
]


@dataclass(frozen=True)
class QAItem:
    """One benchmark question with its gold evidence expressed as our turn ids."""

    question_id: str
    question: str
    answer: str | None
    category: str
    evidence_turn_ids: list[str]
    evidence_session_ids: list[str]
    question_date: datetime | None
    is_abstention: bool
    is_adversarial: bool
    raw_evidence: list[str]
    adversarial_answer: str | None = None


@dataclass(frozen=True)
class Conversation:
    """One user's history (LoCoMo: a conversation; LongMemEval: one question's haystack) and its questions."""

    user_id: str
    turns: list[RawTurn]
    qa: list[QAItem]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def _answer_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return str(value)


def _read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------------------------------------------
# LoCoMo
# ---------------------------------------------------------------------------------------------------------------

_MONTHS = {m: i + 1 for i, m in enumerate(MONTHS)}
_LOCOMO_DT = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*([ap])\.?m\.?\s+on\s+(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})\s*$", re.I)
_SESSION_KEY = re.compile(r"^session_(\d+)$")
_DIA_ID = re.compile(r"^D\s*:?\s*(\d+)\s*:\s*(\d+)$")
# one dia id inside an entry that may hold several ("D1:3 D1:5", "D8:6; D9:17", "D:11:26")
_DIA_PIECE = re.compile(r"D\s*:?\s*\d+\s*:\s*\d+")


def parse_locomo_datetime(text: str) -> datetime:
    """``"1:56 pm on 8 May, 2023"`` → aware UTC datetime. Raises ``ValueError`` on anything else."""
    m = _LOCOMO_DT.match(text)
    if not m:
        raise ValueError(f"unrecognised LoCoMo date {text!r}")
    hour, minute, ampm, day, month_name, year = m.groups()
    month = _MONTHS.get(month_name.lower())
    if month is None:
        raise ValueError(f"unrecognised month in LoCoMo date {text!r}")
    h = int(hour) % 12 + (12 if ampm.lower() == "p" else 0)
    return datetime(int(year), month, int(day), h, int(minute), tzinfo=UTC)


def _normalise_dia_id(piece: str) -> str | None:
    """``'D:11:26'`` → ``'D11:26'``, ``'D30:05'`` → ``'D30:5'``; ``None`` when it is no dia id at all."""
    m = _DIA_ID.match(piece.strip())
    if not m:
        return None
    return f"D{int(m.group(1))}:{int(m.group(2))}"


def _map_locomo_evidence(
    raw: list[Any], dia_to_turn: dict[str, RawTurn], where: str, stats: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Map raw LoCoMo evidence entries to (turn ids, session ids), repairing what is unambiguous."""
    turn_ids: list[str] = []
    session_ids: list[str] = []
    for entry in raw:
        stats["evidence_entries"] += 1
        pieces = _DIA_PIECE.findall(str(entry)) or [p.strip() for p in str(entry).split(";")]
        pieces = [p for p in pieces if p.strip()]
        if not pieces:
            stats["evidence_dropped"] += 1
            stats["warnings"].append(f"{where}: empty evidence entry {entry!r} dropped")
            continue
        for piece in pieces:
            norm = _normalise_dia_id(piece)
            turn = dia_to_turn.get(norm) if norm is not None else None
            if turn is None:
                stats["evidence_dropped"] += 1
                reason = "malformed" if norm is None else "unknown dia_id"
                stats["warnings"].append(f"{where}: {reason} evidence {piece!r} (entry {entry!r}) dropped")
                continue
            if piece != entry or norm != piece:
                stats["evidence_repaired"] += 1
                stats["warnings"].append(f"{where}: evidence {entry!r} repaired to {norm!r}")
            if turn.turn_id not in turn_ids:
                turn_ids.append(turn.turn_id)
            if turn.session_id not in session_ids:
                session_ids.append(turn.session_id)
    return turn_ids, session_ids


def _locomo_conversation(sample: dict[str, Any]) -> Conversation:
    user_id = str(sample["sample_id"])
    conv = sample["conversation"]
    session_numbers = sorted(int(m.group(1)) for k in conv if (m := _SESSION_KEY.match(k)))
    turns: list[RawTurn] = []
    dia_to_turn: dict[str, RawTurn] = {}
    for n in session_numbers:
        session_id = f"session_{n}"
        date_key = f"session_{n}_date_time"
        if date_key not in conv:
            raise ValueError(f"{user_id}: {session_id} has no {date_key}")
        start = parse_locomo_datetime(conv[date_key])
        for seq, t in enumerate(conv[session_id]):
            content = str(t.get("text", ""))
            caption = t.get("blip_caption")
            if caption:
                content = f"{content} [shares a photo: {caption}]" if content else f"[shares a photo: {caption}]"
            speaker = str(t["speaker"])
            dia_id = str(t["dia_id"])
            turn = RawTurn(
                turn_id=turn_id(user_id, session_id, seq),
                user_id=user_id,
                session_id=session_id,
                seq=seq,
                role=speaker,
                speaker=speaker,
                content=content,
                timestamp=start + timedelta(seconds=seq),
                source_id=dia_id,
            )
            turns.append(turn)
            norm = _normalise_dia_id(dia_id) or dia_id
            dia_to_turn.setdefault(dia_id, turn)
            dia_to_turn.setdefault(norm, turn)

    stats: dict[str, Any] = {
        "evidence_entries": 0,
        "evidence_repaired": 0,
        "evidence_dropped": 0,
        "qa_empty_evidence": 0,
        "warnings": [],
    }
    qa: list[QAItem] = []
    for i, q in enumerate(sample.get("qa", [])):
        qid = f"{user_id}:q{i}"
        raw = list(q.get("evidence") or [])
        ev_turns, ev_sessions = _map_locomo_evidence(raw, dia_to_turn, qid, stats)
        if not ev_turns:
            stats["qa_empty_evidence"] += 1
        category = str(q.get("category"))
        qa.append(
            QAItem(
                question_id=qid,
                question=str(q["question"]),
                answer=_answer_str(q.get("answer")),
                category=category,
                evidence_turn_ids=ev_turns,
                evidence_session_ids=ev_sessions,
                question_date=None,
                is_abstention=False,
                is_adversarial=category == "5",
                raw_evidence=[str(e) for e in raw],
                adversarial_answer=_answer_str(q.get("adversarial_answer")),
            )
        )
    for w in stats["warnings"]:
        log.warning("locomo %s", w)
    date_keys = [k for k in conv if k.endswith("_date_time")]
    meta = {
        "speakers": [conv.get("speaker_a"), conv.get("speaker_b")],
        "sessions": len(session_numbers),
        "session_dates_without_session": len(date_keys) - len(session_numbers),
        **stats,
    }
    return Conversation(user_id=user_id, turns=turns, qa=qa, source="locomo", meta=meta)


def load_locomo(path: str | Path) -> list[Conversation]:
    """Load ``locomo10*.json``: one Conversation per sample (user_id = sample_id).

    Evidence entries are mapped from ``dia_id`` to turn ids. Malformed entries are repaired where unambiguous
    (``'D8:6; D9:17'`` → two ids, ``'D:11:26'`` → ``D11:26``, leading zeros dropped) and otherwise dropped;
    each conversation's ``meta`` counts them (``evidence_repaired``, ``evidence_dropped``, ``warnings``).
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LoCoMo samples")
    return [_locomo_conversation(sample) for sample in data]


# ---------------------------------------------------------------------------------------------------------------
# LongMemEval
# ---------------------------------------------------------------------------------------------------------------

_LME_DT = re.compile(r"^\s*(\d{4})/(\d{1,2})/(\d{1,2})\s*(?:\([A-Za-z]+\))?\s*(\d{1,2}):(\d{2})\s*$")


def parse_longmemeval_datetime(text: str) -> datetime:
    """``"2023/05/20 (Sat) 02:21"`` → aware UTC datetime. Raises ``ValueError`` on anything else."""
    m = _LME_DT.match(text)
    if not m:
        raise ValueError(f"unrecognised LongMemEval date {text!r}")
    y, mo, d, h, mi = (int(x) for x in m.groups())
    return datetime(y, mo, d, h, mi, tzinfo=UTC)


def _lme_conversation(rec: dict[str, Any]) -> Conversation:
    qid = str(rec["question_id"])
    user_id = f"lme-{qid}"
    sessions = rec["haystack_sessions"]
    sids = [str(s) for s in rec["haystack_session_ids"]]
    dates = rec["haystack_dates"]
    if not (len(sessions) == len(sids) == len(dates)):
        raise ValueError(
            f"{qid}: haystack_sessions/ids/dates lengths differ ({len(sessions)}/{len(sids)}/{len(dates)})"
        )
    turns: list[RawTurn] = []
    evidence: list[str] = []
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    for raw_sid, date, session in zip(sids, dates, sessions, strict=True):
        # A session id repeated in one haystack (it happens: same session at two times) gets a suffix so
        # its turns keep distinct ids instead of silently overwriting the first copy.
        seen[raw_sid] = seen.get(raw_sid, 0) + 1
        session_id = raw_sid if seen[raw_sid] == 1 else f"{raw_sid}#{seen[raw_sid]}"
        if seen[raw_sid] > 1:
            duplicates.append(session_id)
        start = parse_longmemeval_datetime(str(date))
        for seq, t in enumerate(session):
            role = str(t["role"])
            turn = RawTurn(
                turn_id=turn_id(user_id, session_id, seq),
                user_id=user_id,
                session_id=session_id,
                seq=seq,
                role=role,
                speaker=role,
                content=str(t["content"]),
                timestamp=start + timedelta(seconds=seq),
                source_id=f"{session_id}:{seq}",
            )
            turns.append(turn)
            if t.get("has_answer") is True:
                evidence.append(turn.turn_id)
    if duplicates:
        log.warning("longmemeval %s: repeated haystack session ids renamed: %s", qid, duplicates)
    answer_sids = [str(s) for s in rec.get("answer_session_ids") or []]
    missing = [s for s in answer_sids if s not in seen]
    if missing:
        log.warning("longmemeval %s: answer sessions not in the haystack: %s", qid, missing)
    qdate = rec.get("question_date")
    item = QAItem(
        question_id=qid,
        question=str(rec["question"]),
        answer=_answer_str(rec.get("answer")),
        category=str(rec["question_type"]),
        evidence_turn_ids=evidence,
        evidence_session_ids=answer_sids,
        question_date=parse_longmemeval_datetime(str(qdate)) if qdate else None,
        is_abstention=qid.endswith("_abs"),
        is_adversarial=False,
        raw_evidence=list(answer_sids),
    )
    meta = {
        "question_type": str(rec["question_type"]),
        "sessions": len(sessions),
        "has_answer_turns": len(evidence),
        "duplicate_session_ids": duplicates,
        "answer_sessions_missing": missing,
    }
    return Conversation(user_id=user_id, turns=turns, qa=[item], source="longmemeval", meta=meta)


def load_longmemeval(path: str | Path) -> list[Conversation]:
    """Load a LongMemEval JSON list (S or oracle): ONE Conversation per question, user_id ``lme-<question_id>``.

    Sessions keep file order; each turn's timestamp is its session's own ``haystack_dates`` entry plus ``seq``
    seconds (times are not reordered even where the file has them out of order within a day). Evidence turns
    are the turns flagged ``has_answer``; evidence sessions are ``answer_session_ids`` (also ``raw_evidence``).
    """
    data = _read_json(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LongMemEval records")
    return [_lme_conversation(rec) for rec in data]


# ---------------------------------------------------------------------------------------------------------------
# Our JSONL ingest format
# ---------------------------------------------------------------------------------------------------------------

_JSONL_REQUIRED = ("session_id", "role", "content", "timestamp")
_JSONL_ALLOWED = {
    "user_id",
    "session_id",
    "role",
    "content",
    "timestamp",
    "seq",
    "speaker",
    "source_id",
    "turn_id",
    "schema_version",
}


def _parse_iso(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{where}: timestamp must be an ISO 8601 string, got {type(value).__name__}")
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(f"{where}: timestamp {value!r} is not ISO 8601") from exc
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{where}: timestamp {value!r} has no timezone offset (naive times are not assumed UTC)")
    return ts


def _jsonl_turn(obj: Any, where: str, default_user: str | None, next_seq: dict[tuple[str, str], int]) -> RawTurn:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _JSONL_ALLOWED)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    missing = [k for k in _JSONL_REQUIRED if obj.get(k) is None]
    user_id = obj.get("user_id", default_user)
    if user_id is None:
        missing.insert(0, "user_id")
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    for k in ("user_id", "session_id", "role", "content"):
        v = user_id if k == "user_id" else obj[k]
        if not isinstance(v, str):
            raise ValueError(f"{where}: {k} must be a string, got {type(v).__name__}")
    assert isinstance(user_id, str)  # checked above; narrows for the type checker
    session_id: str = obj["session_id"]
    ts = _parse_iso(obj["timestamp"], where)
    key = (user_id, session_id)
    seq = obj.get("seq")
    if seq is None:
        seq = next_seq.get(key, 0)
    elif isinstance(seq, bool) or not isinstance(seq, int):
        raise ValueError(f"{where}: seq must be an integer, got {seq!r}")
    tid = turn_id(user_id, session_id, seq)
    if obj.get("turn_id") is not None and obj["turn_id"] != tid:
        raise ValueError(f"{where}: turn_id {obj['turn_id']!r} does not match (user_id, session_id, seq)")
    try:
        turn = RawTurn(
            turn_id=tid,
            user_id=user_id,
            session_id=session_id,
            seq=seq,
            role=obj["role"],
            speaker=obj.get("speaker"),
            content=obj["content"],
            timestamp=ts,
            source_id=obj.get("source_id"),
            **({"schema_version": obj["schema_version"]} if "schema_version" in obj else {}),
        )
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{where}: invalid turn ({reasons})") from exc
    next_seq[key] = max(next_seq.get(key, 0), seq + 1)
    return turn


@dataclass(frozen=True)
class LineError:
    """A line of a JSON-lines file that is not a valid turn: where, the line itself, why."""

    where: str
    line: str
    reason: str
    user_id: str | None = None


def iter_jsonl(path: str | Path, default_user: str | None = None) -> Iterator[RawTurn | LineError]:
    """Each non-blank line of our ingest format as a turn or a ``LineError`` (the caller stops, skips or
    dead-letters it); fields as in ``load_jsonl``."""
    next_seq: dict[tuple[str, str], int] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield LineError(where, line.rstrip("\n"), f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            user = obj.get("user_id") if isinstance(obj, dict) and isinstance(obj.get("user_id"), str) else None
            try:
                turn = _jsonl_turn(obj, where, default_user, next_seq)
            except ValueError as exc:
                yield LineError(where, line.rstrip("\n"), str(exc), user or default_user)
                continue
            if turn.turn_id in first_line:
                reason = (
                    f"{where}: duplicate turn (user_id={turn.user_id!r}, session_id={turn.session_id!r}, "
                    f"seq={turn.seq}) first seen on line {first_line[turn.turn_id]}"
                )
                yield LineError(where, line.rstrip("\n"), reason, turn.user_id)
                continue
            first_line[turn.turn_id] = lineno
            yield turn


def load_jsonl(path: str | Path, default_user: str | None = None) -> list[RawTurn]:
    """Load our ingest format: one JSON object per line.

    Fields: ``user_id`` (or ``default_user``), ``session_id``, ``role``, ``content``, ``timestamp`` (ISO 8601
    with an offset), optional ``seq`` (default: next in its session, in file order), ``speaker``, ``source_id``.
    Blank lines are skipped. Any bad line raises ``ValueError`` naming the file, the line number and the reason;
    so does a (user, session, seq) that appears twice.
    """
    turns: list[RawTurn] = []
    for item in iter_jsonl(path, default_user):
        if isinstance(item, LineError):
            raise ValueError(item.reason)
        turns.append(item)
    return turns


def iter_turns(conversations: Iterable[Conversation]) -> Iterator[RawTurn]:
    """All turns of the conversations, conversation by conversation, in their stored order."""
    for conv in conversations:
        yield from conv.turns
