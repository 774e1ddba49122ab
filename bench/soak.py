"""Soak: a bounded run at a steady produce rate through the real broker (loopback), with nothing lost at the end.

``lightmem worker`` (``--workers``) and ``lightmem sink`` run as subprocesses on fresh topics; this process
produces LoCoMo turns (re-keyed to ``--users`` users) at ``--rate`` turns/s for ``--minutes``, then waits until
everything produced is in long-term memory. Every ``--sample-s`` it records:

- RSS of each process (worker(s), sink; psutil, children included);
- consumer lag: the worker group on raw turns and segments, the sink group on summaries (end − committed);
- end-to-end latency of each turn: produced → searchable, i.e. the sink has committed the summary holding
  the turn (it commits after the write, so its memories are in the store). Turns wait in the sensory and STM
  buffers until a batch fills (``stm.threshold_tokens``) or the user goes idle (``stm.idle_timeout_s``), so the
  latency is mostly buffering by design; p50/p95 are reported over all turns.

At the end the sink is stopped, the store opened and every produced turn must be the source of a stored
summary memory ("nothing lost"); the exit code is 1 otherwise. Output: ``<out>/soak.json`` and ``<out>/soak.png``.
Extraction goes to the OpenAI-compatible test server (``tests/llm_server.py``) unless ``--offline``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak.py --minutes 20            # the default bounded run
    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak.py --minutes 3 --rate 2    # a short one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402

from schemas.records import RawTurn, STMSummary  # noqa: E402
from streams.encoder import load_encoder  # noqa: E402
from streams.kafka.produce import make_producer  # noqa: E402
from streams.kafka.topics import TopicReader, committed_offsets, consumer_lag, dumps, key_of, sink_group_id  # noqa: E402
from streams.loaders import load_locomo  # noqa: E402
from streams.ltm import open_store  # noqa: E402
from tests.conftest_kafka import KafkaEnv, LLMProcess, bootstrap_from_env, run_async  # noqa: E402
from tests.faults.common import corpus, users_on_distinct_partitions  # noqa: E402

LOCOMO = Path(os.environ.get("LIGHTMEM_TEST_DATA", "/work/shared/data")) / "locomo10_dev.json"


def rss_mb(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        return (p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))) / 2**20
    except psutil.Error:
        return 0.0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class SummaryTail:
    """Tails the summaries topic in a thread: (partition, offset) → turn ids."""

    def __init__(self, env: KafkaEnv) -> None:
        self.env = env
        self.at: dict[tuple[int, int], list[str]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        k = self.env.settings.kafka
        async with TopicReader(k, k.topics.summaries, client_id=f"{k.app_id}-soak-tail") as reader:
            while not self.stop.is_set():  # a reader kept open follows the topic: each pass reads what is new
                async for batch in reader.batches():
                    for r in batch:
                        try:
                            s = STMSummary.model_validate_json(r.value)
                        except Exception:  # noqa: BLE001 - the erasure barrier or a bad record: no turns
                            continue
                        self.at[(r.partition, r.offset)] = list(s.turn_ids)
                await asyncio.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=2.0, help="turns produced per second")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--drain-timeout-s", type=float, default=600.0)
    ap.add_argument("--offline", action="store_true", help="extractive summaries, no LLM server")
    ap.add_argument("--out", type=Path, default=Path("bench/out/soak"))
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="lightmem-soak-"))
    llm = None if args.offline else LLMProcess(base / "llm.log")
    env = KafkaEnv.create(bootstrap_from_env(), llm.url if llm else None, base, partitions=4)
    env.create_topics()
    users = users_on_distinct_partitions(args.users, env.settings.kafka.partitions, prefix="soak")
    pool = corpus(load_locomo(LOCOMO), users, 30)
    n_target = int(args.minutes * 60 * args.rate)
    by_user: dict[str, list[RawTurn]] = {u: [t for t in pool if t.user_id == u] for u in users}
    turns: list[RawTurn] = []
    i = 0
    while len(turns) < min(n_target, len(pool)):  # round robin over users, each in its own order
        u = users[i % len(users)]
        if by_user[u]:
            turns.append(by_user[u].pop(0))
        i += 1
    workers = [env.worker(f"worker-{j + 1}") for j in range(args.workers)]
    sink = env.sink()
    env.wait_group_members(args.workers, timeout_s=300)
    tail = SummaryTail(env)
    produced_at: dict[str, float] = {}
    searchable_at: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    k = env.settings.kafka
    t0 = time.time()

    def sample(phase: str) -> None:
        now = time.time()
        done = run_async(committed_offsets(k, sink_group_id(k)))
        for (p, off), tids in list(tail.at.items()):
            if done.get((k.topics.summaries, p), 0) > off:
                for t in tids:
                    searchable_at.setdefault(t, now)
        lag_w = run_async(consumer_lag(k, env.name, [k.topics.raw_turns, k.topics.segments]))
        lag_s = run_async(consumer_lag(k, sink_group_id(k), [k.topics.summaries]))
        samples.append(
            {
                "t_s": round(now - t0, 1),
                "phase": phase,
                "produced": len(produced_at),
                "searchable": len(searchable_at),
                "rss_mb": {w.name: round(rss_mb(w.popen.pid), 1) for w in [*workers, sink]},
                "lag": {
                    "raw_turns": lag_w[k.topics.raw_turns],
                    "segments": lag_w[k.topics.segments],
                    "summaries": lag_s[k.topics.summaries],
                },
            }
        )
        print(json.dumps(samples[-1]), flush=True)

    async def produce() -> None:
        producer = make_producer(k, client_id="soak")
        await producer.start()
        try:
            start = time.monotonic()
            next_sample = start
            for j, t in enumerate(turns):
                due = start + j / args.rate
                while time.monotonic() < due:
                    if time.monotonic() >= next_sample:
                        await asyncio.to_thread(sample, "produce")
                        next_sample += args.sample_s
                    await asyncio.sleep(min(0.05, max(0.0, due - time.monotonic())))
                await (await producer.send(k.topics.raw_turns, value=dumps(t), key=key_of(t.user_id)))
                produced_at[t.turn_id] = time.time()
        finally:
            await producer.stop()

    asyncio.run(produce())
    deadline = time.monotonic() + args.drain_timeout_s
    while time.monotonic() < deadline and len(searchable_at) < len(produced_at):
        sample("drain")
        time.sleep(args.sample_s)
    sample("end")
    tail.stop.set()
    sink_rc = sink.terminate()
    for w in workers:
        w.terminate()
    store = open_store(env.settings.store, load_encoder(env.settings.embedding).dim)
    try:
        covered = {t for u in users for m in store.get_all(u) if m.kind == "summary" for t in m.source_turn_ids}
        n_memories = sum(store.count(u) for u in users)
    finally:
        store.close()
    lost = sorted(set(produced_at) - covered)
    lat = [searchable_at[t] - produced_at[t] for t in produced_at if t in searchable_at]
    peak = {name: max(s["rss_mb"].get(name, 0.0) for s in samples) for name in samples[0]["rss_mb"]}
    result = {
        "minutes": args.minutes,
        "rate_turns_per_s": args.rate,
        "users": args.users,
        "workers": args.workers,
        "llm": "test server" if llm else "offline (extractive)",
        "stm": {
            "threshold_tokens": env.settings.stm.threshold_tokens,
            "idle_timeout_s": env.settings.stm.idle_timeout_s,
        },
        "turns_produced": len(produced_at),
        "turns_searchable": len(searchable_at),
        "memories": n_memories,
        "lost_turns": len(lost),
        "latency_s": {
            "p50": pct(lat, 0.5),
            "p95": pct(lat, 0.95),
            "max": max(lat) if lat else None,
            "mean": statistics.fmean(lat) if lat else None,
        },
        "rss_mb_peak": peak,
        "rss_mb_first": samples[0]["rss_mb"],
        "rss_mb_last": samples[-1]["rss_mb"],
        "max_lag": {key: max(s["lag"][key] for s in samples) for key in ("raw_turns", "segments", "summaries")},
        "sink_exit": sink_rc,
        "samples": samples,
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "soak.png")
    print(json.dumps({k2: v for k2, v in result.items() if k2 != "samples"}, indent=2))
    env.close()
    if llm:
        llm.stop()
    return 0 if not lost and sink_rc == 0 else 1


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for name in s[0]["rss_mb"]:
        ax[0].plot(t, [x["rss_mb"].get(name, 0) for x in s], label=name)
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend()
    for key in ("raw_turns", "segments", "summaries"):
        ax[1].plot(t, [x["lag"][key] for x in s], label=key)
    ax[1].set_ylabel("consumer lag (records)")
    ax[1].legend()
    ax[2].plot(t, [x["produced"] for x in s], label="produced")
    ax[2].plot(t, [x["searchable"] for x in s], label="searchable")
    ax[2].set_ylabel("turns")
    ax[2].set_xlabel("minutes")
    ax[2].legend()
    lat = result["latency_s"]
    fig.suptitle(
        f"soak: {result['turns_produced']} turns at {result['rate_turns_per_s']}/s, {result['lost_turns']} lost; "
        f"latency p50 {lat['p50'] or 0:.1f} s, p95 {lat['p95'] or 0:.1f} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
