"""Schemathesis against the running server's /openapi.json: generated requests (valid and invalid) never get a
5xx, and every response matches the status codes, content types and schemas the OpenAPI document declares."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from streams.service.auth import KeyStore
from streams.service.run import build_service, open_memory, serve_in_thread
from streams.settings import ApiSettings, Settings, STMSettings, StoreSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    s = Settings(
        data_dir=tmp,
        store=StoreSettings(path=tmp / "qdrant"),
        stm=STMSettings(idle_timeout_s=3600),
        api=ApiSettings(rate_limit="100000/second", max_batch_turns=20, max_turn_chars=4000, torch_threads=0),
    )
    key, _ = KeyStore(tmp / "api_keys.json").create("fuzz", admin=True)
    memory, encoder = open_memory(s)
    try:
        with serve_in_thread(build_service(s, memory)) as url:
            turn = {
                "user_id": "alex",
                "session_id": "s",
                "role": "user",
                "content": "Alex moved to Lisbon and bought a kayak.",
                "timestamp": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
            }
            headers = {"Authorization": f"Bearer {key}"}
            assert httpx.post(f"{url}/v1/turns?wait=true", json={"turns": [turn]}, headers=headers).status_code == 200
            assert httpx.post(f"{url}/v1/users/alex/flush", headers=headers).status_code == 200
            yield url, key
    finally:
        memory.close()
        encoder.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_declared_answers(fuzzed, mode):
    url, key = fuzzed
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    ran = 0

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=checks, timeout=60)

        try:
            check()
        except Unsatisfiable:
            # an operation without inputs (healthz, metrics, costs, ...) has no invalid request to generate
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        ran += 1
    assert ran >= (15 if mode is GenerationMode.POSITIVE else 8)
