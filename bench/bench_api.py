"""Benchmark the memory service against in-process ``Memory`` (loopback only, bounded in count and time).

Search: a synthetic store of ``--n`` memories (as ``bench_search.py`` builds it) over ``--users`` users of one
tenant. The same queries go (a) to ``Memory.search`` in this process, one at a time, and (b) to ``lightmem serve``
(a separate process) from 1, 8 and 32 concurrent clients in a closed loop. Reported: p50/p95 latency, requests/s,
and the ratios to in-process.

Ingest: the first ``--turns`` turns of a LoCoMo conversation, extractive mode (no LLM), (a) ``Memory.add_turns`` in
batches of 64 then a flush, (b) ``POST /v1/turns`` batches of 64 (202) then ``POST /v1/users/{u}/flush`` (which
waits for the queue), each into a fresh store. Reported: turns/s and the ratio API / embedded.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_api.py --n 100000 --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from bench_search import MONTHS, NAMES, PLACES, QUESTIONS, THINGS, make_records, pct, sentences

from streams.api import Memory
from streams.encoder import load_encoder
from streams.loaders import load_locomo
from streams.ltm import open_store
from streams.service.auth import KeyStore
from streams.settings import ApiSettings, EmbeddingSettings, Settings, StoreSettings

REPO = Path(__file__).resolve().parents[1]
TENANT = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_for(root: Path, torch_threads: int) -> Settings:
    api = ApiSettings(rate_limit="1000000/second", torch_threads=torch_threads)
    return Settings(data_dir=root, store=StoreSettings(path=root / "qdrant"), api=api)


def env_for(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTMEM_")}
    env.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        LIGHTMEM_DATA_DIR=str(settings.data_dir),
        LIGHTMEM_STORE__PATH=str(settings.store.path),
        LIGHTMEM_API__RATE_LIMIT=settings.api.rate_limit,
        LIGHTMEM_API__PORT=str(port),
        LIGHTMEM_API__TORCH_THREADS=str(settings.api.torch_threads),
    )
    return env


class ServerProcess:
    """``lightmem serve`` in a child process on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env_for(settings, self.port),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lightmem serve exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("lightmem serve did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def build_store(settings: Settings, n: int, users: int) -> None:
    enc = load_encoder(EmbeddingSettings())
    texts = sentences(2000, random.Random(0))
    recs, vecs = make_records(n, users, texts, enc.embed(texts), np.random.default_rng(n))
    recs = [r.model_copy(update={"user_id": f"{TENANT}:{r.user_id}"}) for r in recs]
    store = open_store(settings.store, enc.dim)
    try:
        for i in range(0, n, 1000):
            store.upsert(recs[i : i + 1000], vecs[i : i + 1000])
        optimize = getattr(store, "optimize", None)
        if optimize is not None:
            optimize()
    finally:
        store.close()


def queries(count: int, users: int) -> list[tuple[str, str]]:
    rng = random.Random(7)
    return [
        (
            f"user-{rng.randrange(users):04d}",
            rng.choice(QUESTIONS).format(
                n=rng.choice(NAMES), p=rng.choice(PLACES), t=rng.choice(THINGS), m=rng.choice(MONTHS)
            ),
        )
        for _ in range(count)
    ]


def in_process(settings: Settings, qs: list[tuple[str, str]]) -> dict[str, float]:
    with Memory(settings) as memory:
        for u, q in qs[:10]:
            memory.search(q, f"{TENANT}:{u}", 10)
        lat = []
        t0 = time.perf_counter()
        for u, q in qs:
            t = time.perf_counter()
            memory.search(q, f"{TENANT}:{u}", 10)
            lat.append((time.perf_counter() - t) * 1000)
        wall = time.perf_counter() - t0
    return {"p50": pct(lat, 50), "p95": pct(lat, 95), "rps": len(qs) / wall}


async def over_http(url: str, key: str, qs: list[tuple[str, str]], clients: int, max_s: float) -> dict[str, float]:
    lat: list[float] = []
    it = iter(qs)
    deadline = time.monotonic() + max_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as http:
        for u, q in qs[:10]:
            (await http.get("/v1/search", params={"q": q, "user_id": u, "limit": 10})).raise_for_status()

        async def client() -> None:
            for u, q in it:
                if time.monotonic() > deadline:
                    return
                t = time.perf_counter()
                r = await http.get("/v1/search", params={"q": q, "user_id": u, "limit": 10})
                r.raise_for_status()
                lat.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"p50": pct(lat, 50), "p95": pct(lat, 95), "rps": len(lat) / wall, "n": len(lat)}


def ingest_embedded(settings: Settings, turns: list) -> float:  # noqa: ANN001 - RawTurn list
    with Memory(settings) as memory:
        t0 = time.perf_counter()
        for i in range(0, len(turns), 64):
            memory.add_turns(turns[i : i + 64])
        for u in sorted({t.user_id for t in turns}):
            memory.flush(u)
        return len(turns) / (time.perf_counter() - t0)


def ingest_api(settings: Settings, key: str, turns: list) -> float:  # noqa: ANN001
    server = ServerProcess(settings)
    try:
        body = [
            t.model_dump(
                mode="json", include={"user_id", "session_id", "seq", "role", "speaker", "content", "timestamp"}
            )
            for t in turns
        ]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
            t0 = time.perf_counter()
            for i in range(0, len(body), 64):
                http.post("/v1/turns", json={"turns": body[i : i + 64]}).raise_for_status()
            for u in sorted({t.user_id for t in turns}):
                http.post(f"/v1/users/{u}/flush").raise_for_status()
            return len(turns) / (time.perf_counter() - t0)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="memories in the search store")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--requests", type=int, default=400, help="search requests per concurrency level")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-s", type=float, default=60.0, help="time cap per concurrency level")
    ap.add_argument("--turns", type=int, default=300, help="LoCoMo turns for the ingest comparison (0 = skip)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "locomo10_dev.json"))
    ap.add_argument("--store", type=Path, help="keep the search store here and reuse it when it exists")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads, in-process and in the server alike (0 = default)",
    )
    args = ap.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)  # the in-process runs use what the server uses
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    root = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        store_dir = args.store or root / "search"
        search_settings = settings_for(store_dir, args.torch_threads)
        key, _ = KeyStore(search_settings.data_dir / "api_keys.json").create(TENANT)
        if (store_dir / "built").exists():
            print(f"reusing the store in {store_dir}")
        else:
            t = time.perf_counter()
            build_store(search_settings, args.n, args.users)
            (store_dir / "built").write_text(str(args.n))
            print(f"built a {args.n}-memory store over {args.users} users in {time.perf_counter() - t:.0f} s")
        qs = queries(args.requests, args.users)
        base = in_process(search_settings, qs)
        print(f"in-process Memory.search: p50 {base['p50']:.1f} ms, p95 {base['p95']:.1f} ms, {base['rps']:.1f}/s")
        server = ServerProcess(search_settings)
        try:
            rows = {
                c: asyncio.run(over_http(server.url, key, qs, c, args.max_s)) for c in map(int, args.clients.split(","))
            }
        finally:
            server.stop()
        print(f"\nsearch, top 10, {args.n} memories (ms; ratio = API / in-process Memory.search, 1 caller)")
        print(f"{'clients':>8} {'p50':>7} {'p95':>7} {'req/s':>7} {'p50 x':>6} {'p95 x':>6} {'req/s x':>7}")
        print(
            f"{'in-proc':>8} {base['p50']:>7.1f} {base['p95']:>7.1f} {base['rps']:>7.1f} {1:>6.2f} {1:>6.2f} {1:>7.2f}"
        )
        for c, r in rows.items():
            print(
                f"{c:>8} {r['p50']:>7.1f} {r['p95']:>7.1f} {r['rps']:>7.1f} {r['p50'] / base['p50']:>6.2f} "
                f"{r['p95'] / base['p95']:>6.2f} {r['rps'] / base['rps']:>7.2f}"
            )
        if 8 in rows:
            verdict = "meets" if rows[8]["p95"] <= 50 else "misses"
            print(f"8 clients: p95 {rows[8]['p95']:.1f} ms {verdict} the 50 ms target")

        if args.turns:
            convs = load_locomo(args.data)
            turns = convs[0].turns[: args.turns]
            emb = ingest_embedded(settings_for(root / "ingest-embedded", args.torch_threads), turns)
            api_settings = settings_for(root / "ingest-api", args.torch_threads)
            ikey, _ = KeyStore(api_settings.data_dir / "api_keys.json").create(TENANT)
            api = ingest_api(api_settings, ikey, turns)
            print(
                f"\ningest, {len(turns)} LoCoMo turns, extractive mode: embedded {emb:.1f} turns/s, API {api:.1f} "
                f"turns/s, ratio {api / emb:.2f} (target ≥ 0.8)"
            )
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\n{os.cpu_count()} CPUs, load average at the end {load}; server and load generator share them")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
