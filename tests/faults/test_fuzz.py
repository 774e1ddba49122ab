"""R4: fuzzed records on every topic and fuzzed lines for the JSONL loader (hypothesis). Each ends as a record,
a dead letter with its stage, reason and the original bytes, or a clear ``ValueError`` naming the line; nothing
raises anything else, so a stream goes on past any input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.records import DeadLetter, Record
from streams.kafka.codec import decode
from streams.kafka.topics import record_key, topic_specs
from streams.loaders import load_jsonl
from streams.settings import KafkaSettings
from tests.factories import raw_turn

pytestmark = [pytest.mark.faults]

SPECS = topic_specs(KafkaSettings(partitions=4))
VALID = json.loads(raw_turn("alice", "s1", 0, "hello").model_dump_json())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)


def mutated(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid record with fields dropped, replaced by junk or added."""
    return st.builds(
        lambda drop, junk, extra: {
            **{k: v for k, v in base.items() if k not in drop},
            **junk,
            **extra,
        },
        st.sets(st.sampled_from(sorted(base)), max_size=3),
        st.dictionaries(st.sampled_from(sorted(base)), json_values, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=1),
    )


payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated(VALID).map(lambda v: json.dumps(v).encode()),
)
keys = st.one_of(st.none(), st.binary(max_size=20), st.just(b"alice"), st.just(record_key("alice", "x")))


def _check(got: Any, value: bytes, stage: str) -> None:
    if isinstance(got, DeadLetter):
        assert got.stage == stage and got.reason and got.error_type
        assert got.payload.encode("latin-1") == value  # the original bytes, verbatim
    else:
        assert isinstance(got, Record)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(SPECS), key=keys, value=payloads)
def test_every_topic_decodes_to_a_record_or_a_dead_letter(spec: Any, key: bytes | None, value: bytes) -> None:
    msg = SimpleNamespace(topic=spec.name, partition=0, offset=7, key=key, value=value)
    _check(decode(spec, msg, "ingest"), value, "ingest")


def test_a_valid_turn_decodes_and_a_wrong_key_is_a_dead_letter() -> None:
    (spec,) = [s for s in SPECS if s.role == "raw_turns"]
    value = json.dumps(VALID).encode()
    ok = decode(spec, SimpleNamespace(topic=spec.name, partition=0, offset=1, key=b"alice", value=value), "ingest")
    assert not isinstance(ok, DeadLetter) and ok.user_id == "alice"  # type: ignore[attr-defined]
    bad = decode(spec, SimpleNamespace(topic=spec.name, partition=0, offset=1, key=b"bob", value=value), "ingest")
    assert isinstance(bad, DeadLetter) and bad.error_type == "KeyMismatch"


lines = st.one_of(
    st.text(max_size=80).filter(lambda s: "\n" not in s and "\r" not in s),
    json_values.map(json.dumps),
    mutated({k: VALID[k] for k in ("user_id", "session_id", "role", "content", "timestamp")}).map(json.dumps),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(lines, min_size=1, max_size=4))
def test_jsonl_loader_gives_turns_or_a_clear_error(tmp_path: Path, body: list[str]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(body) + "\n", encoding="utf-8")
    try:
        turns = load_jsonl(path)
    except ValueError as exc:
        assert str(path) in str(exc)  # names the file and line
        return
    assert all(t.user_id and t.session_id for t in turns)
