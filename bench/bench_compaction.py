"""Benchmark the sleep-time update: compaction time and LLM calls at N stored memories with the same M new ones.

For each N (default 10k and 100k) a fresh embedded store holds N "old" memories spread over ``--users`` users,
all already compacted (each user's watermark is set after them, as a previous nightly run would leave it). Then
M new memories arrive (default 200, spread over the users): half are near-duplicates of one of the user's stored
memories (its vector plus small noise, its text with a new tag), half are novel. One compaction run follows, by
the LLM (the OpenAI-compatible test server from ``tests.llm_server`` started in-process, answering "delete" or
"update" for a duplicate and "ignore" otherwise, optional ``--latency-s`` per answer) and/or the offline rule.

Synthetic data (said plainly): ``--bases`` distinct template sentences are embedded once with the real MiniLM
encoder; stored and novel memories reuse them with a random perturbation of the vector (noise of norm
``--noise`` before re-normalising, so that two memories built from similar templates stay below the similarity
threshold); near-duplicates add noise of norm ``--dup-noise`` to a stored memory's vector. Re-embedding of
changed memories during the run uses the real encoder.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_compaction.py --n 10000,100000 --new 200 --modes llm,offline

Prints a table and one JSON object (``--json-out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.records import MemoryRecord  # noqa: E402
from streams.encoder import Encoder, load_encoder  # noqa: E402
from streams.ids import memory_id  # noqa: E402
from streams.ltm import open_store  # noqa: E402
from streams.settings import EmbeddingSettings, LLMSettings, Settings, SleepSettings, StoreSettings  # noqa: E402
from streams.sleep import Compactor, Watermarks  # noqa: E402
from tests.llm_server import is_compaction_prompt, parse_compaction_prompt  # noqa: E402

NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca"]
PLACES = ["Reykjavik", "Lisbon", "Kyoto", "Nairobi", "Lima", "Oslo", "Hanoi", "Quebec", "Tbilisi", "Cusco", "Bergen"]
THINGS = ["a golden retriever", "a vintage bicycle", "a sourdough starter", "a violin", "a kayak", "a telescope"]
ACTS = [
    "went hiking in",
    "moved to",
    "gave a talk in",
    "ran a marathon in",
    "started a new job in",
    "visited family in",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
T0 = datetime(2023, 1, 1, tzinfo=UTC)
TAG = re.compile(r" \[[a-z]\d+\]$")


def templates(k: int, rng: random.Random) -> list[str]:
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


def perturb(vecs: np.ndarray, norm: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(size=vecs.shape).astype(np.float32)
    noise *= norm / np.linalg.norm(noise, axis=1, keepdims=True)
    out = vecs + noise
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def record(user: str, i: int, text: str, ts: datetime) -> MemoryRecord:
    turn = f"{user}-t{i}"
    return MemoryRecord(
        memory_id=memory_id(user, [turn], 0, "fact"),
        user_id=user,
        session_ids=["s"],
        text=text,
        kind="fact",
        source_turn_ids=[turn],
        event_timestamps=[ts],
        topic_id="t",
        summary_id="s",
        pipeline_version="bench",
        created_at=ts,
        updated_at=ts,
    )


def build(n: int, new: int, args: argparse.Namespace, base_texts: list[str], base_vecs: np.ndarray):  # noqa: ANN201
    """(stored records, their vectors, new records, their vectors, the users' watermark)."""
    rng = np.random.default_rng(n)
    idx = rng.integers(0, len(base_texts), size=n)
    users = [f"user-{u:04d}" for u in range(args.users)]
    stored = [
        record(users[i % args.users], i, f"{base_texts[idx[i]]} [s{i}]", T0 + timedelta(minutes=i // args.users))
        for i in range(n)
    ]
    stored_vecs = perturb(base_vecs[idx], args.noise, rng)
    mark = max(r.updated_at for r in stored)
    fresh: list[MemoryRecord] = []
    fresh_vecs: list[np.ndarray] = []
    by_user: dict[str, list[int]] = {}
    for i, r in enumerate(stored):
        by_user.setdefault(r.user_id, []).append(i)
    for j in range(new):
        user = users[j % args.users]
        ts = mark + timedelta(hours=1, seconds=j)
        if j % 2 == 0:  # a near-duplicate of one of the user's stored memories
            src = int(rng.choice(by_user[user]))
            text = TAG.sub("", stored[src].text) + f" [n{j}]"
            vec = perturb(stored_vecs[src : src + 1], args.dup_noise, rng)[0]
        else:  # something new
            b = int(rng.integers(0, len(base_texts)))
            text = f"{base_texts[b]} [n{j}]"
            vec = perturb(base_vecs[b : b + 1], args.noise, rng)[0]
        fresh.append(record(user, n + j, text, ts))
        fresh_vecs.append(vec)
    return stored, stored_vecs, fresh, np.stack(fresh_vecs), mark


def responder(messages: list[dict[str, Any]]) -> str | None:
    """The bench's LLM: for each new memory of a (batched) prompt, an older memory with the new one's text (tags
    aside) is deleted as a duplicate, or, for every fourth new memory, updated (rewritten text: re-embedded);
    every other pair is left out (ignored)."""
    if not is_compaction_prompt(messages):
        return None
    decisions = []
    decided: set[int] = set()
    for (new, _, new_text), older in parse_compaction_prompt(messages):
        key = TAG.sub("", new_text)
        tag = re.search(r"\[n(\d+)\]$", new_text)
        rewrite = tag is not None and int(tag.group(1)) % 4 == 2
        for alias, _, text in older:
            if alias in decided or TAG.sub("", text) != key:
                continue
            decided.add(alias)
            if rewrite:
                decisions.append(
                    {
                        "new": new,
                        "old": alias,
                        "action": "update",
                        "text": f"{key} (confirmed again)",
                        "reason": "repeat",
                    }
                )
            else:
                decisions.append({"new": new, "old": alias, "action": "delete", "reason": "duplicate"})
    return json.dumps({"decisions": decisions})


def run_one(n: int, mode: str, args: argparse.Namespace, enc: Encoder, data: tuple, server: Any) -> dict[str, Any]:
    stored, stored_vecs, fresh, fresh_vecs, mark = build(n, args.new, args, *data)
    root = Path(tempfile.mkdtemp(prefix=f"bench-compaction-{n}-"))
    llm = (
        LLMSettings(base_url=server.url, model="bench-model", max_concurrency=args.concurrency)
        if mode == "llm"
        else LLMSettings()
    )
    settings = Settings(
        data_dir=root / "state",
        store=StoreSettings(path=root / "qdrant"),
        llm=llm,
        sleep=SleepSettings(k=args.k, similarity_threshold=args.threshold),
    )
    store = open_store(settings.store, enc.dim)
    t = time.perf_counter()
    for i in range(0, n, 2048):
        store.upsert(stored[i : i + 2048], stored_vecs[i : i + 2048])
    load_s = time.perf_counter() - t
    if hasattr(store, "optimize"):
        store.optimize()
    marks = Watermarks.in_dir(settings.data_dir)
    now = datetime.now(UTC)
    for user in sorted({r.user_id for r in stored}):
        marks.set(user, mark, now)  # the previous nightly run
    store.upsert(fresh, fresh_vecs)
    if server is not None:
        server.reset()

    async def go() -> Any:
        c = Compactor(settings, store, enc.embed)
        try:
            return await c.run()
        finally:
            await c.aclose()

    t = time.perf_counter()
    report = asyncio.run(go())
    total_s = time.perf_counter() - t
    # a second run with nothing new: no LLM call
    t = time.perf_counter()
    again = asyncio.run(go())
    again_s = time.perf_counter() - t
    store.close()
    shutil.rmtree(root, ignore_errors=True)
    a = report.actions
    return {
        "mode": mode,
        "stored": n,
        "new": len(fresh),
        "users": args.users,
        "targets": report.targets,
        "llm_calls": report.cost.calls,
        "input_tokens": report.cost.input_tokens,
        "output_tokens": report.cost.output_tokens,
        "candidates": sum(u.candidates for u in report.users),
        "updates": a["update"],
        "deletes": a["delete"],
        "ignores": a["ignore"],
        "dead_letters": len(report.dead_letters),
        "seconds": total_s,
        "scan_s": report.scan_seconds,
        "search_s": report.search_seconds,
        "apply_s": report.apply.seconds,
        "second_run_calls": again.cost.calls,
        "second_run_s": again_s,
        "load_s": load_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", default="10000,100000", help="stored memories, comma-separated")
    p.add_argument("--new", type=int, default=200, help="new memories per run")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--modes", default="llm,offline", help="llm and/or offline")
    p.add_argument("--bases", type=int, default=3000, help="distinct template sentences embedded")
    p.add_argument("--noise", type=float, default=0.8, help="norm of the noise on stored/novel vectors")
    p.add_argument("--dup-noise", type=float, default=0.2, help="norm of the noise on near-duplicates")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--concurrency", type=int, default=4, help="LLM calls in flight")
    p.add_argument("--latency-s", type=float, default=0.0, help="test server delay per answer")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()

    enc = load_encoder(EmbeddingSettings())
    t = time.perf_counter()
    base_texts = templates(args.bases, random.Random(7))
    base_vecs = enc.embed(base_texts)
    embed_s = time.perf_counter() - t
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    server = None
    if "llm" in modes:
        from tests.llm_server import LLMServer

        server = LLMServer(latency_s=args.latency_s).start()
        server.register(responder)
    rows = []
    try:
        for n in [int(x) for x in args.n.split(",")]:
            for mode in modes:
                rows.append(run_one(n, mode, args, enc, (base_texts, base_vecs), server))
                print(f"done: {mode} at {n}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()

    cols = [
        ("mode", "mode", "{}"),
        ("stored", "stored", "{}"),
        ("new", "new", "{}"),
        ("targets", "targets", "{}"),
        ("LLM calls", "llm_calls", "{}"),
        ("in tok", "input_tokens", "{}"),
        ("cands", "candidates", "{}"),
        ("del", "deletes", "{}"),
        ("upd", "updates", "{}"),
        ("ign", "ignores", "{}"),
        ("total s", "seconds", "{:.2f}"),
        ("scan s", "scan_s", "{:.2f}"),
        ("search s", "search_s", "{:.2f}"),
        ("apply s", "apply_s", "{:.2f}"),
        ("2nd run calls", "second_run_calls", "{}"),
        ("2nd run s", "second_run_s", "{:.2f}"),
    ]
    cells = [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(cols)]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
    ratios = {}
    ns = sorted({r["stored"] for r in rows})
    for mode in modes:
        by_n = {r["stored"]: r for r in rows if r["mode"] == mode}
        if len(ns) >= 2 and ns[0] in by_n and ns[-1] in by_n:
            lo, hi = by_n[ns[0]], by_n[ns[-1]]
            ratios[mode] = {
                "stored_ratio": hi["stored"] / lo["stored"],
                "llm_calls_ratio": (hi["llm_calls"] / lo["llm_calls"]) if lo["llm_calls"] else None,
                "seconds_ratio": hi["seconds"] / lo["seconds"],
                "seconds_without_scan_ratio": (hi["seconds"] - hi["scan_s"]) / (lo["seconds"] - lo["scan_s"]),
            }
    out = {
        "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
        "base_embed_s": embed_s,
        "rows": rows,
        "ratios": ratios,
    }
    print(json.dumps(out, default=str))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
