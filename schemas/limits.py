"""Input limits, in one place: every record that carries a user id, a session id, a role or a turn's text
validates it with these types, so the CLI, the embedded API, the HTTP service and the Kafka topics reject the
same inputs with the same reasons (a clear error, or a dead letter on a topic).

- user id: ``[A-Za-z0-9][A-Za-z0-9._@-]{0,127}``, or a tenant-scoped ``<tenant>:<user>`` where both parts have
  that form (``:`` appears only as the separator); no ``/``, no ``..`` path tricks, no control characters;
- session id: ``[A-Za-z0-9][A-Za-z0-9._@#:-]{0,127}`` (``#`` marks a repeated session of a dataset);
- role and speaker: 1..64 / up to 128 printable characters;
- turn content: at most ``MAX_TURN_BYTES`` (128 KiB) of UTF-8; a longer turn is an error, never truncated;
- a batch (one API call, one produce request): at most ``MAX_BATCH_TURNS`` turns.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StringConstraints

ID_PART = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}"
USER_ID_PATTERN = rf"^{ID_PART}(?::{ID_PART})?$"
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@#:-]{0,127}$"
MAX_TURN_BYTES = 128 * 1024  # LongMemEval holds a 75 KB pasted web page; a 400 KB turn is refused
MAX_BATCH_TURNS = 1000
MAX_ROLE_CHARS = 64
MAX_SPEAKER_CHARS = 128


def _printable(value: str) -> str:
    if any(not ch.isprintable() for ch in value):
        raise ValueError("must not contain control characters")
    return value


def _turn_size(value: str) -> str:
    size = len(value.encode("utf-8"))
    if size > MAX_TURN_BYTES:
        raise ValueError(f"turn content is {size} bytes of UTF-8; the limit is {MAX_TURN_BYTES} (split the turn)")
    return value


UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN, max_length=257)]
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
Role = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ROLE_CHARS), AfterValidator(_printable)]
Speaker = Annotated[str, StringConstraints(max_length=MAX_SPEAKER_CHARS), AfterValidator(_printable)]
TurnContent = Annotated[str, AfterValidator(_turn_size)]


def check_batch(n: int) -> None:
    """Raise ``ValueError`` when a batch holds more turns than one request may."""
    if n > MAX_BATCH_TURNS:
        raise ValueError(f"{n} turns in one batch; the limit is {MAX_BATCH_TURNS} (send several batches)")
