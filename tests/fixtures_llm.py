"""Pytest fixtures for the OpenAI-compatible test server (tests/llm_server.py).

- ``llm_server`` (session): one running ``LLMServer`` for the whole run.
- ``llm`` (function): the same server, reset (faults, recorded requests, counters, latency) before the test.
- ``llm_settings(server, **overrides)``: ``LLMSettings`` pointing at it, with a small backoff and timeout.

Import both fixtures where they are needed (e.g. ``from tests.fixtures_llm import llm, llm_server`` in a
conftest).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from streams.settings import LLMSettings
from tests.llm_server import LLMServer

TEST_MODEL = "test-model"


def llm_settings(server: LLMServer, **overrides: Any) -> LLMSettings:
    """LLMSettings for the test server: backoff 0.01 s, timeout 2 s, 3 retries, unless overridden."""
    values: dict[str, Any] = {
        "base_url": server.url,
        "model": TEST_MODEL,
        "api_key": "test-key",
        "timeout_s": 2.0,
        "max_retries": 3,
        "backoff_s": 0.01,
        "max_concurrency": 4,
    }
    values.update(overrides)
    return LLMSettings(**values)


@pytest.fixture(scope="session")
def llm_server() -> Iterator[LLMServer]:
    server = LLMServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llm(llm_server: LLMServer) -> Iterator[LLMServer]:
    llm_server.reset()
    llm_server.latency_s = 0.0
    llm_server.hang_s = 30.0
    yield llm_server
    llm_server.reset()
