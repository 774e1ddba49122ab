"""Input limits (schemas.limits): each bad input is refused with a reason that names the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.limits import MAX_BATCH_TURNS, MAX_TURN_BYTES, check_batch
from schemas.records import RawTurn
from tests.factories import raw_turn


@pytest.mark.parametrize("user", ["alice", "conv-26", "a.b@c-d_e", "acme:alice", "t1:u.2", "x" * 128])
def test_accepted_user_ids(user: str) -> None:
    assert raw_turn(user, "session_1", 0, "hi").user_id == user


@pytest.mark.parametrize(
    "user", ["", "../../etc", "a/b", "-lead", "a b", "a:b:c", ":alice", "acme:", "x" * 129, "\x00x", "ali\nce"]
)
def test_refused_user_ids(user: str) -> None:
    with pytest.raises(ValidationError, match="user_id"):
        raw_turn(user, "session_1", 0, "hi")


def test_session_role_and_size_limits() -> None:
    assert raw_turn("u", "answer_4be1b6b4_1#2", 0, "hi").session_id == "answer_4be1b6b4_1#2"
    with pytest.raises(ValidationError, match="session_id"):
        raw_turn("u", "../s", 0, "hi")
    with pytest.raises(ValidationError, match="role"):
        raw_turn("u", "s", 0, "hi", role="r" * 65)
    ok = raw_turn("u", "s", 0, "é" * (MAX_TURN_BYTES // 2))
    assert len(ok.content.encode()) == MAX_TURN_BYTES
    with pytest.raises(ValidationError, match="bytes of UTF-8; the limit is"):
        raw_turn("u", "s", 0, "x" * (400 * 1024))  # never truncated silently
    with pytest.raises(ValidationError, match="content"):
        RawTurn.model_validate_json(ok.model_dump_json().replace('"content":"', '"content":"é'))
    check_batch(MAX_BATCH_TURNS)
    with pytest.raises(ValueError, match="limit"):
        check_batch(MAX_BATCH_TURNS + 1)
