"""Dead letters: a record that a stage could not process, with the reason. Never a silent drop.

The embedded runner appends them to a local JSON-lines log; the Kafka shell produces the same
records to the dead-letter topic.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from schemas import DeadLetter
from streams import ids, metrics


def dead_letter(
    stage: str, reason: str, error_type: str, payload: str | bytes, key: str | None, attempts: int = 1
) -> DeadLetter:
    text = payload.decode("latin-1") if isinstance(payload, bytes) else payload
    now = datetime.now(UTC)
    return DeadLetter(
        dlq_id=ids.derived_id("dlq", stage, key or "", text, now.isoformat()),
        stage=stage,  # type: ignore[arg-type]
        reason=reason or error_type,
        error_type=error_type,
        attempts=attempts,
        key=key,
        payload=text,
        at=now,
    )


class DeadLetterSink(Protocol):
    def send(self, record: DeadLetter) -> None: ...


class DeadLetterLog:
    """Append-only JSON-lines file of dead letters (embedded mode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def send(self, record: DeadLetter) -> None:
        metrics.observe_dead_letter(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(record.model_dump_json() + "\n")

    def read(self) -> list[DeadLetter]:
        if not self.path.exists():
            return []
        return [DeadLetter.model_validate(json.loads(line)) for line in self.path.read_text().splitlines() if line]
