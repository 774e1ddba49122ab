"""The run's checkpoint: an append-only JSONL of finished units, and the compact encoding of per-question
results it stores."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streams.eval.metrics import QuestionEval
from streams.loaders import Conversation

CHECKPOINT = "checkpoint.jsonl"


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
        if q.extra.get("batch"):  # the turns of each item's STM batch (the generous credit, reported apart)
            d["batch"] = [enc(i) for i in q.extra["batch"]]
        questions.append(d)
    return {"questions": questions, "shared": shared}


def decode_questions(rec: Mapping[str, Any], conv: Conversation) -> list[QuestionEval]:
    """Inverse of :func:`encode_questions` against the same conversation."""
    qas = {qa.question_id: qa for qa in conv.qa}
    t2s = turn_to_session(conv)

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
                extra={
                    **({"kinds": d["kinds"]} if d.get("kinds") else {}),
                    **({"batch": tuple(dec(i) for i in d["batch"])} if d.get("batch") else {}),
                },
            )
        )
    return out


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


def turn_to_session(conv: Conversation) -> dict[str, str]:
    return {t.turn_id: t.session_id for t in conv.turns}
