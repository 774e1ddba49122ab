"""Benchmark the long-term memory store: search latency (query embedding included), ingest rate, RSS and disk.

Synthetic data: a few thousand distinct template sentences are embedded once with the real encoder; the
N memories reuse them round-robin with a small random perturbation of the vector (re-normalised), spread
over ``--users`` users. Queries are fresh template questions embedded at query time (ONNX Runtime when the
model qualifies, see ``streams.onnx_encoder``; the JSON line says which). Half the memories are the user's own
turns; ``hybrid_asker`` is the search of a first-person question (``streams.ranking.search_preferring``: the plain
and the user's-own rankings, ``--depth`` deep each, fused), as ``Memory.search`` runs it.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_search.py --n 10000,100000 --queries 200
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psutil

from schemas.records import MemoryRecord, SourceTurn
from streams.encoder import Encoder, load_encoder
from streams.ids import memory_id
from streams.ltm import MemoryStore, open_store
from streams.ranking import search_preferring
from streams.settings import EmbeddingSettings, StoreSettings

NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca"]
PLACES = ["Reykjavik", "Lisbon", "Kyoto", "Nairobi", "Lima", "Oslo", "Hanoi", "Quebec", "Tbilisi", "Cusco", "Bergen"]
THINGS = [
    "a golden retriever",
    "a vintage bicycle",
    "a sourdough starter",
    "a violin",
    "a kayak",
    "a telescope",
    "a bonsai tree",
    "an espresso machine",
    "a chess set",
    "a drone",
    "a sewing machine",
    "a film camera",
]
ACTS = [
    "went hiking in",
    "moved to",
    "gave a talk in",
    "ran a marathon in",
    "celebrated a birthday in",
    "started a new job in",
    "took a cooking class in",
    "visited family in",
    "lost a wallet in",
    "got engaged in",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
QUESTIONS = [
    "Where did {n} go in {m}?",
    "What does {n} own?",
    "When did {n} visit {p}?",
    "Who bought {t}?",
    "What happened to {n} in {p}?",
    "Does {n} like {t}?",
    "What did {n} do last {m}?",
]
T0 = datetime(2023, 1, 1, tzinfo=UTC)


def sentences(k: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < k:
        n, p, t, a, m = (rng.choice(x) for x in (NAMES, PLACES, THINGS, ACTS, MONTHS))
        out.add(
            rng.choice(
                [
                    f"{n} {a} {p} in {m}.",
                    f"{n} bought {t} in {p} during {m}.",
                    f"In {m}, {n} {a} {p} and brought {t}.",
                    f"{n} says {t} from {p} is their favourite thing since {m}.",
                ]
            )
            + f" ({rng.randint(1, 999)})"
        )
    return sorted(out)


def make_records(n: int, users: int, base_texts: list[str], base_vecs: np.ndarray, rng: np.random.Generator):
    recs, idx = [], rng.integers(0, len(base_texts), size=n)
    for i in range(n):
        user = f"user-{i % users:04d}"
        ts = T0 + timedelta(hours=int(i // users))
        turn = f"{user}-t{i}"
        role = "user" if i % 2 == 0 else "assistant"  # half the memories the user's own turns
        source = SourceTurn(turn_id=turn, session_id="s", seq=0, role=role, timestamp=ts, text=base_texts[idx[i]])
        recs.append(
            MemoryRecord(
                memory_id=memory_id(user, [turn], 0, "fact"),
                user_id=user,
                session_ids=["s"],
                text=base_texts[idx[i]],
                kind="summary" if i % 10 == 0 else "fact",
                source_turn_ids=[turn],
                source_turns=[source],
                event_timestamps=[ts],
                topic_id="t",
                summary_id="s",
                pipeline_version="bench",
                created_at=ts,
                updated_at=ts,
            )
        )
    vecs = base_vecs[idx] + rng.normal(scale=0.02, size=(n, base_vecs.shape[1])).astype(np.float32)
    return recs, (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def du(path: Path) -> int:
    """Allocated bytes (like ``du``), not apparent sizes of sparse/preallocated files."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def timed_queries(
    search: Callable[[str, str, np.ndarray | None], object],
    embed: Callable[[str], np.ndarray] | None,
    queries: list[tuple[str, str]],
) -> dict[str, float]:
    """Latency per query including the query embedding (when the mode needs one), and the store's share."""
    for u, q in queries[:5]:  # warm-up
        search(u, q, embed(q) if embed else None)
    total, store = [], []
    for u, q in queries:
        t0 = time.perf_counter()
        vec = embed(q) if embed else None
        t1 = time.perf_counter()
        search(u, q, vec)
        t2 = time.perf_counter()
        total.append((t2 - t0) * 1000)
        store.append((t2 - t1) * 1000)
    return {
        "p50_ms": pct(total, 50),
        "p95_ms": pct(total, 95),
        "mean_ms": statistics.fmean(total),
        "store_p50_ms": pct(store, 50),
        "store_p95_ms": pct(store, 95),
    }


def run_one(
    backend: str, n: int, args: argparse.Namespace, enc: Encoder, data: tuple[list[str], np.ndarray], modes: list[str]
) -> dict[str, object]:
    rng = np.random.default_rng(n)
    recs, vecs = make_records(n, args.users, *data, rng)
    root = Path(tempfile.mkdtemp(prefix=f"bench-{backend}-"))
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss  # records already built: the delta is the store (plus allocator slack)
    store: MemoryStore = open_store(StoreSettings(backend=backend, path=root), enc.dim)  # type: ignore[arg-type]
    t = time.perf_counter()
    for i in range(0, n, args.batch):
        store.upsert(recs[i : i + args.batch], vecs[i : i + args.batch])
    ingest_s = time.perf_counter() - t
    out: dict[str, object] = {"backend": backend, "n": n, "users": args.users, "ingest_per_s": n / ingest_s}
    gc.collect()
    rss = proc.memory_info().rss - rss0
    del recs, vecs
    if backend == "edge" and args.optimize:
        t = time.perf_counter()
        store.optimize()  # type: ignore[attr-defined]
        out["optimize_s"] = time.perf_counter() - t
    qrng = random.Random(n)
    nq = args.queries if backend == "edge" else min(args.queries, args.local_queries)
    queries = [
        (
            f"user-{qrng.randrange(args.users):04d}",
            qrng.choice(QUESTIONS).format(
                n=qrng.choice(NAMES), p=qrng.choice(PLACES), t=qrng.choice(THINGS), m=qrng.choice(MONTHS)
            ),
        )
        for _ in range(nq)
    ]
    for mode in modes:

        def search(user: str, q: str, vec: np.ndarray | None, mode: str = mode) -> object:
            return store.search(user, q, vec, 10, mode=mode)  # type: ignore[arg-type]

        out[mode] = timed_queries(search, enc.embed_one if mode != "sparse" else None, queries)
    if "hybrid" in modes:  # a first-person question: the user's own turns preferred, as Memory.search does it

        def asker(user: str, q: str, vec: np.ndarray | None) -> object:
            return search_preferring(store, user, q, vec, 10, mode="hybrid", roles=("user",), depth=args.depth)

        out["hybrid_asker"] = timed_queries(asker, enc.embed_one, queries)
    out["embed_only"] = timed_queries(lambda u, q, v: None, enc.embed_one, queries)
    if enc.onnx is not None:  # the same queries through PyTorch, for the ratio measured in this run
        onnx, enc.onnx = enc.onnx, None
        try:
            out["embed_torch"] = timed_queries(lambda u, q, v: None, enc.embed_one, queries)
        finally:
            enc.onnx = onnx
    store.close()
    out["rss_mb_per_10k"] = max(rss, 0) / 2**20 * 10_000 / n
    out["disk_mb_per_10k"] = du(root) / 2**20 * 10_000 / n
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="10000,100000", help="comma-separated corpus sizes (edge backend)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--depth", type=int, default=50, help="ranking depth of a preferred search (store.prefetch)")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--distinct", type=int, default=2000, help="distinct sentences embedded for the corpus")
    ap.add_argument("--batch", type=int, default=1000, help="records per upsert call")
    ap.add_argument("--local-n", type=int, default=10000, help="qdrant-client local mode size (0 = skip)")
    ap.add_argument("--local-queries", type=int, default=20)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for query embedding (0 = torch default); 1 is fastest for one short query",
    )
    ap.add_argument("--optimize", action="store_true", help="run EdgeShard.optimize() after ingest")
    args = ap.parse_args()

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    enc = load_encoder(EmbeddingSettings())
    texts = sentences(args.distinct, random.Random(0))
    t = time.perf_counter()
    data = (texts, enc.embed(texts))
    embed_s = time.perf_counter() - t
    print(
        f"embedded {len(texts)} distinct synthetic sentences in {embed_s:.1f}s; corpora reuse them with "
        "perturbed vectors (noise 0.02, re-normalised)"
    )
    results = [run_one("edge", int(n), args, enc, data, ["hybrid", "dense", "sparse"]) for n in args.n.split(",")]
    if args.local_n:
        results.append(run_one("local", args.local_n, args, enc, data, ["hybrid"]))

    cols = ["hybrid", "hybrid_asker", "dense", "sparse"]
    head = " ".join(f"{c + ' p50/p95 (store)':>28}" for c in cols)
    print(
        f"\n{'backend':7} {'n':>7} {head} {'embed p50/p95':>14} {'ingest/s':>9} {'RSS MB/10k':>10} {'disk MB/10k':>11}"
    )
    for r in results:
        cells = []
        for c in cols + ["embed_only"]:
            m = r.get(c)
            if not isinstance(m, dict):
                cells.append(f"{'-':>28}" if c != "embed_only" else f"{'-':>14}")
            elif c == "embed_only":
                cells.append(f"{m['p50_ms']:>7.1f}/{m['p95_ms']:<6.1f}")
            else:
                cells.append(
                    f"{m['p50_ms']:>7.1f}/{m['p95_ms']:<6.1f} ({m['store_p50_ms']:.1f}/{m['store_p95_ms']:.1f})".rjust(
                        28
                    )
                )
        print(
            f"{r['backend']:7} {r['n']:>7} "
            + " ".join(cells)
            + f" {r['ingest_per_s']:>9.0f} {r['rss_mb_per_10k']:>10.1f} {r['disk_mb_per_10k']:>11.1f}"
        )
    print("latencies in ms, search of top 10 incl. query embedding (store-only share in brackets)")
    for r in results:
        torch_ms, onnx_ms = r.get("embed_torch"), r.get("embed_only")
        if isinstance(torch_ms, dict) and isinstance(onnx_ms, dict):
            ratio = torch_ms["p50_ms"] / onnx_ms["p50_ms"]
            print(f"query embedding p50, PyTorch / ONNX Runtime ({r['backend']}, {r['n']}): {ratio:.1f}x")
    target = next((r for r in results if r["backend"] == "edge" and r["n"] == 100_000), None)
    if target is not None:
        h = target["hybrid"]
        assert isinstance(h, dict)
        ok = h["p50_ms"] <= 15 and h["p95_ms"] <= 30
        print(f"\ntarget (edge, 100k, hybrid incl. embedding: p50 <= 15 ms, p95 <= 30 ms): {'MET' if ok else 'MISSED'}")
    meta = {
        "distinct_sentences": len(texts),
        "torch_threads": args.torch_threads,
        "query_encoder": "onnxruntime" if enc.onnx is not None else "torch",
        "cpus": psutil.cpu_count(),
    }
    print(json.dumps({"bench": "ltm_search", **meta, "load_avg": psutil.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()
