"""Streaming mode through the real broker: ``lightmem serve --kafka`` (the API, the LTM sink and the compaction
agent in one process) with two workers; a LoCoMo conversation posted through ``POST /v1/turns`` under a tenant key.
Reads through the API succeed while the stream writes, and the final memory ids equal the embedded run's."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest

import tests.conftest as _root
from streams import ids
from streams.service.auth import KeyStore
from tests.conftest_kafka import KafkaEnv, LLMProcess, embedded_in_background

if not hasattr(_root, "kafka_env"):
    from tests.conftest_kafka import kafka_bootstrap, llm_proc  # noqa: F401

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_ids(url: str, headers: dict[str, str], user: str) -> dict[str, str]:
    out: dict[str, str] = {}
    cursor = None
    while True:
        params = {"user_id": user, **({"cursor": cursor} if cursor else {})}
        r = httpx.get(f"{url}/v1/memories", params=params, headers=headers, timeout=30)
        r.raise_for_status()
        page = r.json()
        out.update({m["memory_id"]: m["text"] for m in page["memories"]})
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_serve_kafka_reads_live_and_ends_equal_to_embedded(
    kafka_bootstrap: str, llm_proc: LLMProcess, locomo_conversations: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    conv = next(c for c in locomo_conversations if c.user_id.endswith("conv-30"))
    sessions = list(dict.fromkeys(t.session_id for t in conv.turns))[:3]
    turns = [t for t in conv.turns if t.session_id in sessions]
    user = turns[0].user_id
    env = KafkaEnv.create(kafka_bootstrap, llm_proc.url, tmp_path_factory.mktemp("serve-kafka"), idle_timeout_s=8.0)
    key, _ = KeyStore(env.data_dir / "api_keys.json").create("acme")
    headers = {"Authorization": f"Bearer {key}"}
    internal = f"acme:{user}"
    # the reference: the embedded pipeline on the same turns under the tenant-scoped user id
    scoped = [
        t.model_copy(update={"user_id": internal, "turn_id": ids.turn_id(internal, t.session_id, t.seq)}) for t in turns
    ]
    reference = embedded_in_background(env.settings, scoped, env.data_dir / "embedded")
    try:
        env.create_topics()
        port = _port()
        url = f"http://127.0.0.1:{port}"
        api = env.spawn("api", "serve", "--kafka", "--host", "127.0.0.1", "--port", str(port))
        env.worker("worker-1")
        env.worker("worker-2")

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:  # not listening yet
                return False

        env.wait_for("the API to be ready", ready, 180)
        env.wait_group_members(2)

        body = [
            t.model_dump(
                mode="json", include={"user_id", "session_id", "seq", "role", "speaker", "content", "timestamp"}
            )
            for t in turns
        ]
        statuses: list[int] = []
        counts: list[int] = []
        for i in range(0, len(body), 8):
            r = httpx.post(f"{url}/v1/turns", json={"turns": body[i : i + 8]}, headers=headers, timeout=60)
            assert r.status_code == 202, r.text
            assert r.json()["turn_ids"] == [t.turn_id for t in scoped[i : i + 8]]
            s = httpx.get(f"{url}/v1/search", params={"q": "adoption", "user_id": user}, headers=headers, timeout=60)
            statuses.append(s.status_code)
            counts.append(len(_memory_ids(url, headers, user)))
            time.sleep(0.3)

        flush = httpx.post(f"{url}/v1/users/{user}/flush", headers=headers, timeout=30)
        assert flush.status_code == 409 and "idle" in flush.json()["detail"]  # the workers own the buffers

        def covered() -> bool:
            s = httpx.get(f"{url}/v1/search", params={"q": "adoption", "user_id": user}, headers=headers, timeout=60)
            statuses.append(s.status_code)
            counts.append(len(_memory_ids(url, headers, user)))
            return counts[-1] > 0 and {t.turn_id for t in scoped} <= {
                tid for sm in env.summaries() for tid in sm.turn_ids
            }

        env.wait_for("summaries covering every posted turn", covered, timeout_s=240, every_s=0.5)
        env.wait_sink_caught_up()
        final = _memory_ids(url, headers, user)
        expected = reference.result(timeout=300)

        assert set(statuses) == {200}, statuses  # every read during the stream answered
        # ...and saw memory grow while the sink wrote (sampled from the first post on), never shrink
        assert len(set(counts)) >= 2, counts
        assert counts == sorted(counts), counts
        assert len(expected) > 10
        assert set(final) == set(expected), (sorted(set(final) ^ set(expected))[:5], api.tail())
        assert final == {mid: text for mid, (_, text) in expected.items()}
        # a memory's source turns, with what was said, come from the sink's own store (the raw-turn log is sealed)
        said = {t.turn_id: t.content for t in scoped}
        for mid in sorted(final)[:5]:
            d = httpx.get(f"{url}/v1/memories/{mid}", params={"user_id": user}, headers=headers, timeout=30).json()
            assert [t["turn_id"] for t in d["source_turns"]] == d["source_turn_ids"]
            assert all(t["text"] == said[t["turn_id"]] for t in d["source_turns"])
        assert api.terminate() == 0, api.tail()
    finally:
        env.close()
