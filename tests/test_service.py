"""The memory service over real HTTP (uvicorn on 127.0.0.1): keys and tenants on every route, bad input, the
client against ``Memory`` on the same store, MCP tools, and the store's single owner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from streams.api import Memory
from streams.client import AsyncMemoryClient, ForbiddenError, MemoryClient, NotFoundError
from streams.service.auth import KeyStore
from streams.service.run import build_service, open_memory, serve_in_thread
from streams.service.state import Service
from streams.settings import ApiSettings, Settings, STMSettings, StoreSettings

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def _settings(tmp: Path, **api: object) -> Settings:
    return Settings(
        data_dir=tmp,
        store=StoreSettings(path=tmp / "qdrant"),
        stm=STMSettings(idle_timeout_s=3600),
        # torch_threads=0: leave torch's process-wide thread count to the rest of the test session
        api=ApiSettings(rate_limit="1000/second", torch_threads=0, **api),  # type: ignore[arg-type]
    )


@dataclass
class Server:
    url: str
    settings: Settings
    memory: Memory
    service: Service
    keys: dict[str, str]

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


def _turns(user: str, texts: list[str], session: str = "s1", start: datetime = T0) -> list[dict]:
    return [
        {
            "user_id": user,
            "session_id": session,
            "role": "user",
            "content": text,
            "timestamp": (start + timedelta(minutes=i)).isoformat(),
        }
        for i, text in enumerate(texts)
    ]


ALEX_A = ["I adopted a grey cat named Miso from the shelter last spring.", "Miso likes to sleep on my keyboard."]
ALEX_B = ["My favourite sport is rock climbing in the Alps.", "I train at the climbing gym twice a week."]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("service")
    settings = _settings(tmp, max_batch_turns=5, max_turn_chars=2000)
    store = KeyStore(tmp / "api_keys.json")
    keys = {
        "a": store.create("acme")[0],
        "a_admin": store.create("acme", admin=True)[0],
        "b": store.create("beta")[0],
        "b_admin": store.create("beta", admin=True)[0],
    }
    revoked, row = store.create("acme")
    store.revoke(row.key_id)
    keys["revoked"] = revoked
    memory, encoder = open_memory(settings)
    service = build_service(settings, memory)
    try:
        with serve_in_thread(service) as url:
            srv = Server(url, settings, memory, service, keys)
            for who, user, texts in (("a", "alex", ALEX_A), ("b", "alex", ALEX_B), ("a", "ann", ALEX_A[:1])):
                r = httpx.post(f"{url}/v1/turns?wait=true", json={"turns": _turns(user, texts)}, headers=srv.h(who))
                assert r.status_code == 200, r.text
                r = httpx.post(f"{url}/v1/users/{user}/flush", headers=srv.h(who))
                assert r.status_code == 200, r.text
            yield srv
    finally:
        memory.close()
        encoder.close()


def _search(srv: Server, who: str, user: str, q: str = "pet cat") -> httpx.Response:
    return httpx.get(f"{srv.url}/v1/search", params={"q": q, "user_id": user}, headers=srv.h(who))


def test_tenants_share_a_user_name_and_never_see_each_other(server):
    a = _search(server, "a", "alex").json()["results"]
    b = _search(server, "b", "alex").json()["results"]
    assert a and b
    assert all(h["record"]["user_id"] == "alex" for h in a + b)  # the tenant prefix never leaves the server
    a_texts = " ".join(h["record"]["text"] for h in a)
    b_texts = " ".join(h["record"]["text"] for h in b)
    assert "Miso" in a_texts and "Miso" not in b_texts and "climbing" in b_texts and "climbing" not in a_texts
    assert not {h["record"]["memory_id"] for h in a} & {h["record"]["memory_id"] for h in b}
    # in the store, each tenant's user is its own id
    assert set(server.memory.users()) >= {"acme:alex", "beta:alex", "acme:ann"}


def _routes(srv: Server) -> list[tuple[str, str, dict]]:
    """(method, path, request kwargs) of every /v1 route, aimed at acme's user ann and one of her memories."""
    mem = server_memory(srv, "acme:ann")
    return [
        ("POST", "/v1/turns", {"json": {"turns": _turns("ann", ["hello there"], session="auth")}}),
        ("POST", "/v1/users/ann/flush", {}),
        ("GET", "/v1/search", {"params": {"q": "cat", "user_id": "ann"}}),
        ("GET", "/v1/memories", {"params": {"user_id": "ann"}}),
        ("GET", f"/v1/memories/{mem}", {"params": {"user_id": "ann"}}),
        ("GET", f"/v1/memories/{mem}/history", {}),
        ("POST", "/v1/changes/00000000-0000-0000-0000-000000000000/revert", {}),
        ("POST", "/v1/compact", {"json": {"users": ["ann"]}}),
        ("GET", "/v1/costs", {}),
        ("DELETE", "/v1/users/ann", {}),
    ]


def server_memory(srv: Server, internal_user: str) -> str:
    return srv.memory.get_all(internal_user)[0].memory_id


def test_every_v1_route_needs_a_valid_key(server):
    bad = {
        "none": {},
        "not bearer": {"Authorization": f"Basic {server.keys['a']}"},
        "malformed": {"Authorization": "Bearer nonsense"},
        "wrong secret": {"Authorization": f"Bearer {server.keys['a'][:-2]}xx"},
        "revoked": server.h("revoked"),
    }
    for method, path, kw in _routes(server):
        for label, headers in bad.items():
            r = httpx.request(method, server.url + path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, label, r.text)
            assert r.headers.get("www-authenticate") == "Bearer"


def test_another_tenants_user_is_not_found(server):
    mem = server_memory(server, "acme:ann")
    for who in ("b", "b_admin"):
        for method, path, kw in [
            ("POST", "/v1/users/ann/flush", {}),
            ("GET", "/v1/search", {"params": {"q": "cat", "user_id": "ann"}}),
            ("GET", "/v1/memories", {"params": {"user_id": "ann"}}),
            ("GET", f"/v1/memories/{mem}", {"params": {"user_id": "ann"}}),
        ]:
            r = httpx.request(method, server.url + path, headers=server.h(who), **kw)
            assert r.status_code == 404, (who, method, path, r.text)
        # beta's own alex exists, but acme's memory id is not hers
        r = httpx.get(f"{server.url}/v1/memories/{mem}", params={"user_id": "alex"}, headers=server.h(who))
        assert r.status_code == 404
        r = httpx.get(f"{server.url}/v1/memories/{mem}/history", headers=server.h(who))
        assert r.status_code == 200 and r.json() == []
    for method, path, kw in [("DELETE", "/v1/users/ann", {}), ("POST", "/v1/compact", {"json": {"users": ["ann"]}})]:
        r = httpx.request(method, server.url + path, headers=server.h("b_admin"), **kw)
        assert r.status_code == 404, (method, path, r.text)
    assert server.memory.get_all("acme:ann")  # untouched


def test_erasure_and_compaction_need_an_admin_key(server):
    for method, path, kw in [
        ("DELETE", "/v1/users/ann", {}),
        ("POST", "/v1/compact", {"json": {"users": ["ann"]}}),
        ("POST", "/v1/compact", {}),
    ]:
        r = httpx.request(method, server.url + path, headers=server.h("a"), **kw)
        assert r.status_code == 403, (method, path, r.text)
    assert server.memory.get_all("acme:ann")
    r = httpx.get(f"{server.url}/v1/costs", headers=server.h("a"))
    assert r.status_code == 200 and "embedding" in r.json()["stages"]


def test_bad_turns_are_refused_with_a_reason_per_turn(server):
    def post(turns: list[dict]) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/turns", json={"turns": turns}, headers=server.h("a"))

    good = _turns("bob", ["fine"])[0]
    cases = {
        "user_id": {**good, "user_id": "acme:bob"},
        "timestamp": {**good, "timestamp": "2026-03-01T09:00:00"},  # no offset
        "content": {**good, "content": "x" * 2001},
        "extra": {**good, "mood": "happy"},
        "role": {k: v for k, v in good.items() if k != "role"},
    }
    for field, turn in cases.items():
        r = post([good, turn])
        assert r.status_code == 422, (field, r.text)
        locs = [d["loc"] for d in r.json()["detail"]]
        assert any(loc[:3] == ["body", "turns", 1] for loc in locs), (field, locs)
    r = post([good] * 6)
    assert r.status_code == 422 and "at most 5 turns" in r.text
    r = post([{**good, "seq": 3}, {**good, "seq": 3}])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "turns", 1, "seq"]
    r = httpx.post(f"{server.url}/v1/turns", json={"turns": []}, headers=server.h("a"))
    assert r.status_code == 422
    assert not server.service.users.exists("acme:bob")  # nothing of a refused batch was taken


def test_bad_reads_are_refused(server):
    base = {"q": "cat", "user_id": "alex"}
    for params in (
        {**base, "since": "2026-01-01T00:00:00"},
        {**base, "since": "2026-02-01T00:00:00+00:00", "until": "2026-01-01T00:00:00+00:00"},
        {**base, "limit": 0},
        {**base, "limit": 101},
        {**base, "mode": "fuzzy"},
        {**base, "user_id": "a:b"},
        {"user_id": "alex"},
    ):
        r = httpx.get(f"{server.url}/v1/search", params=params, headers=server.h("a"))
        assert r.status_code == 422, (params, r.text)
    r = httpx.get(f"{server.url}/v1/memories", params={"user_id": "alex", "cursor": "zz"}, headers=server.h("a"))
    assert r.status_code == 422
    r = httpx.get(f"{server.url}/v1/memories/not-a-uuid", params={"user_id": "alex"}, headers=server.h("a"))
    assert r.status_code == 422


def test_search_and_list_can_leave_out_the_source_turns(server):
    """The raw text of each record's source turns comes by default; source_turns=false leaves it out, ids kept."""
    h = server.h("a")
    for path, params, key in (
        ("/v1/search", {"q": "cat", "user_id": "alex"}, "results"),
        ("/v1/memories", {"user_id": "alex"}, "memories"),
    ):
        full = httpx.get(f"{server.url}{path}", params=params, headers=h).json()[key]
        lean = httpx.get(f"{server.url}{path}", params={**params, "source_turns": "false"}, headers=h).json()[key]
        records = [(x["record"] if key == "results" else x) for x in full]
        leaner = [(x["record"] if key == "results" else x) for x in lean]
        assert records and any(r["source_turns"] for r in records)
        assert [r["memory_id"] for r in leaner] == [r["memory_id"] for r in records]
        assert [r["source_turn_ids"] for r in leaner] == [r["source_turn_ids"] for r in records]
        assert all(r["source_turns"] == [] for r in leaner)
        assert len(json.dumps(lean)) < len(json.dumps(full))


def test_pages_walk_all_memories(server):
    everything = server.memory.get_all("acme:alex")
    seen, cursor = [], None
    while True:
        params = {"user_id": "alex", "limit": 1, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{server.url}/v1/memories", params=params, headers=server.h("a")).json()
        seen.extend(m["memory_id"] for m in page["memories"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [m.memory_id for m in everything]


def test_client_equals_memory_on_the_same_store(server):
    with MemoryClient(server.url, server.keys["a"]) as client:
        asked = T0 + timedelta(days=14)  # a relative date in the query counts from when it is asked
        for q, as_of in (
            ("cat from the shelter", None),
            ("keyboard", None),
            ("what does alex like?", None),
            ("what did alex adopt two weeks ago?", asked),
        ):
            for mode in (None, "dense", "sparse"):
                over_http = client.search(q, "alex", 5, mode=mode, as_of=as_of)
                local = server.memory.search(q, "acme:alex", 5, mode=mode, as_of=as_of)
                assert [(h.record.memory_id, h.record.text) for h in over_http] == [
                    (h.record.memory_id, h.record.text) for h in local
                ]
                assert [h.score for h in over_http] == pytest.approx([h.score for h in local], abs=1e-5)
        assert [m.memory_id for m in client.get_all("alex")] == [
            m.memory_id for m in server.memory.get_all("acme:alex")
        ]
        mem = client.get_all("alex")[0]
        view = client.get(mem.memory_id, "alex")
        assert view is not None and view.record == mem and view.user_id == "alex"
        local_view = server.memory.get(mem.memory_id, "acme:alex")
        assert local_view is not None and view.source_turns == local_view.source_turns and view.source_turns
        assert [t.turn_id for t in view.source_turns] == mem.source_turn_ids
        assert client.get("00000000-0000-0000-0000-000000000000", "alex") is None
        with pytest.raises(NotFoundError):
            client.search("cat", "nobody")
        with pytest.raises(ForbiddenError):
            client.erase("alex")


async def test_async_client_adds_and_finds(server):
    async with AsyncMemoryClient(server.url, server.keys["b"]) as client:
        report = await client.add(
            [{"role": "user", "content": "I am learning to play the cello."}], user_id="cara", timestamp=T0
        )
        assert report.turns == 1
        flushed = await client.flush("cara")
        assert flushed.memories and all(m.user_id == "cara" for m in flushed.memories)
        hits = await client.search("which instrument?", user_id="cara", limit=3)
        assert any("cello" in h.record.text for h in hits)


def test_rate_limit_answers_429_with_retry_after(server, tmp_path):
    limited = Service(
        server.settings.model_copy(update={"api": ApiSettings(rate_limit="3/minute", torch_threads=0)}),
        server.memory,
        keys=KeyStore(server.settings.data_dir / "api_keys.json"),
    )
    try:
        with serve_in_thread(limited, owner=False) as url:
            codes = [
                _search(Server(url, server.settings, server.memory, limited, server.keys), "a", "alex")
                for _ in range(4)
            ]
            assert [r.status_code for r in codes[:3]] == [200, 200, 200]
            assert codes[3].status_code == 429 and 1 <= int(codes[3].headers["retry-after"]) <= 60
            other = httpx.get(f"{url}/v1/search", params={"q": "x", "user_id": "alex"}, headers=server.h("b"))
            assert other.status_code == 200  # per key
    finally:
        limited.writer.close() if limited.writer else None
        limited.searches.close()


def test_health_ready_metrics(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["store"] is True and ready.json()["mode"] == "embedded"
    _search(server, "a", "alex")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'lightmem_http_requests_total{method="GET",route="/v1/search",status="200"}' in text
    assert "lightmem_stage_seconds_bucket" in text and "lightmem_store_write_seconds_bucket" in text


def test_compaction_revert_and_erasure_over_http(server):
    h = server.h("a_admin")
    dup = "Dana keeps a collection of vintage fountain pens at home."
    for i, text in enumerate([dup, dup + " ", dup]):
        turns = _turns("dana", [text], session=f"s{i}", start=T0 + timedelta(days=i))
        assert httpx.post(f"{server.url}/v1/turns", json={"turns": turns}, headers=h).status_code == 202
        assert httpx.post(f"{server.url}/v1/users/dana/flush", headers=h).status_code == 200
    r = httpx.post(f"{server.url}/v1/compact", json={"users": ["dana"], "full": True}, headers=h)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == "embedded" and [run["user_id"] for run in out["runs"]] == ["dana"]
    changes = [c for run in out["runs"] for c in run["changes"] if c["action"] != "ignore"]
    assert changes and all(c["user_id"] == "dana" for c in changes)
    change = changes[-1]  # the last change of its memory: nothing since stands in the way of undoing it
    detail = httpx.get(f"{server.url}/v1/memories/{change['memory_id']}", params={"user_id": "dana"}, headers=h)
    assert detail.status_code == 200 and change["change_id"] in [c["change_id"] for c in detail.json()["changes"]]
    sources = detail.json()["source_turns"]
    assert detail.json()["source_turn_ids"] == [t["turn_id"] for t in sources]
    assert sources and all(t["text"].startswith(dup) and t["session_id"] in {"s0", "s1", "s2"} for t in sources)
    # another tenant cannot revert it; the owner can
    other = httpx.post(f"{server.url}/v1/changes/{change['change_id']}/revert", headers=server.h("b_admin"))
    assert other.status_code == 404
    rev = httpx.post(f"{server.url}/v1/changes/{change['change_id']}/revert", headers=server.h("a"))
    assert rev.status_code == 200, rev.text
    assert rev.json()["revert"]["reverts"] == change["change_id"] and rev.json()["reverted"]["user_id"] == "dana"
    gone = httpx.delete(f"{server.url}/v1/users/dana", headers=h)
    assert gone.status_code == 200 and gone.json()["memories"] >= 1 and gone.json()["user_id"] == "dana"
    assert server.memory.get_all("acme:dana") == []
    # the source turns' texts went with the memories and the change log
    assert server.memory.get(change["memory_id"], "acme:dana") is None
    assert httpx.get(f"{server.url}/v1/memories", params={"user_id": "dana"}, headers=h).status_code == 404


async def use_the_mcp_tools(session, user_id: str, content: str, query: str, word: str) -> None:  # noqa: ANN001
    """Every tool once over an initialised MCP session: add, search (finds ``word``), list, forget."""
    await session.initialize()
    names = {t.name for t in (await session.list_tools()).tools}
    assert names == {"add_memory", "search_memory", "list_memories", "forget_user"}
    added = await session.call_tool("add_memory", {"content": content, "user_id": user_id})
    assert not added.is_error and added.structured_content["memories"]
    found = await session.call_tool("search_memory", {"query": query, "user_id": user_id})
    assert not found.is_error
    hits = found.structured_content["result"]
    assert hits and word in hits[0]["text"]
    listed = await session.call_tool("list_memories", {"user_id": user_id})
    assert {m["memory_id"] for m in listed.structured_content["result"]} >= {hits[0]["memory_id"]}
    gone = await session.call_tool("forget_user", {"user_id": user_id})
    assert gone.structured_content["memories"] >= 1


def test_mcp_tools_round_trip_over_the_client(server):
    import anyio
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LIGHTMEM_API__URL": server.url,
        "LIGHTMEM_API__KEY": server.keys["a_admin"],
        "LIGHTMEM_DATA_DIR": str(server.settings.data_dir / "mcp-client"),
    }
    params = StdioServerParameters(command=sys.executable, args=["-m", "streams.cli", "mcp"], env=env, cwd=str(REPO))

    async def run() -> None:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await use_the_mcp_tools(
                session, "eve", "Eve's daughter plays the violin in an orchestra.", "violin", "violin"
            )

    anyio.run(run)
    assert server.memory.get_all("acme:eve") == []  # the tools went through the server, under the key's tenant


def test_mcp_tools_over_streamable_http(server):
    import socket
    import time

    import anyio
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LIGHTMEM_API__URL": server.url,
        "LIGHTMEM_API__KEY": server.keys["a_admin"],
        "LIGHTMEM_DATA_DIR": str(server.settings.data_dir / "mcp-http-client"),
    }
    cmd = [sys.executable, "-m", "streams.cli", "mcp", "--http", "--port", str(port)]
    refused = subprocess.run([*cmd, "--host", "0.0.0.0"], env=env, cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "loopback" in refused.stderr  # no keys of its own: loopback only
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "lightmem mcp --http did not listen"
            time.sleep(0.2)

        async def run() -> None:
            url = f"http://127.0.0.1:{port}/mcp"
            async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
                content = "Finn repairs old sailing boats in his garage."
                await use_the_mcp_tools(session, "finn", content, "sailing boats", "sailing")

        anyio.run(run)
    finally:
        proc.terminate()
        proc.wait(30)
    assert server.memory.get_all("acme:finn") == []  # through the server, under the key's tenant


def test_second_process_opening_the_owned_store_gets_one_line(server):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LIGHTMEM_DATA_DIR": str(server.settings.data_dir),
        "LIGHTMEM_STORE__PATH": str(server.settings.store.path),
    }
    env.pop("LIGHTMEM_API__URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "search", "cat", "--user", "alex"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert str(os.getpid()) in lines[0] and f"LIGHTMEM_API__URL={server.url}" in lines[0]
    assert "Traceback" not in out.stderr


def test_cli_goes_through_the_server_when_its_url_is_set(server):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LIGHTMEM_API__URL": server.url,
        "LIGHTMEM_API__KEY": server.keys["a"],
        "LIGHTMEM_DATA_DIR": str(server.settings.data_dir / "cli-client"),  # no store of its own is opened
        "COLUMNS": "200",
    }
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "search", "grey cat shelter", "--user", "alex"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Miso" in out.stdout and "climbing" not in out.stdout
    denied = subprocess.run(
        [sys.executable, "-m", "streams.cli", "forget", "--user", "alex", "--yes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert denied.returncode != 0 and "403" in denied.stderr and "Traceback" not in denied.stderr
    assert server.memory.get_all("acme:alex")


def test_concurrent_searches_share_one_encoder_pass_and_equal_single_searches(server):
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import REGISTRY

    from streams.ltm import MissingUserError
    from streams.service.search import SearchBatcher, SearchRequest

    queries = ["cat from the shelter", "keyboard", "what does alex like?", "grey pet", "spring", "sleeping", "Miso"]
    cases = [(q, mode) for q in queries for mode in (None, "dense", "sparse")]
    alone = [server.memory.search(q, "acme:alex", 5, mode=mode) for q, mode in cases]

    def passes() -> float:
        return REGISTRY.get_sample_value("lightmem_search_encode_batch_count") or 0.0

    batcher = SearchBatcher(server.memory, window_s=0.05)
    before = passes()
    try:
        futures = [batcher.submit(SearchRequest(q, "acme:alex", 5, mode=mode)) for q, mode in cases]
        bad = batcher.submit(SearchRequest("cat", "", 5))  # a bad search fails alone
        together = [f.result(timeout=120) for f in futures]
        with pytest.raises(MissingUserError):
            bad.result(timeout=120)
    finally:
        batcher.close()
    dense_cases = sum(mode != "sparse" for _, mode in cases)
    assert 1 <= passes() - before < dense_cases  # the dense and hybrid queries went through shared passes
    for (q, mode), a, b in zip(cases, alone, together, strict=True):
        assert [h.record.memory_id for h in b] == [h.record.memory_id for h in a], (q, mode)
        assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-5)
    # and over HTTP, many at once (the route goes through the service's batcher)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda q: _search(server, "a", "alex", q), queries))
    for q, r in zip(queries, responses, strict=True):
        assert r.status_code == 200
        want = [h.record.memory_id for h in server.memory.search(q, "acme:alex", 10)]
        assert [hit["record"]["memory_id"] for hit in r.json()["results"]] == want, q
