"""Throughput through Kafka vs the embedded runner, and two workers vs one, on the same LoCoMo turns.

Three runs on one input (``--users`` LoCoMo conversations, their first ``--sessions`` sessions, each re-keyed
to a user id on its own partition so the work can spread):

1. **embedded**: ``EmbeddedPipeline`` in this process (ingest every turn, flush) — models loaded beforehand;
2. **kafka ×1**: one ``lightmem worker`` + the ``lightmem sink`` (subprocesses) on fresh topics;
3. **kafka ×2**: two workers + the sink on fresh topics.

A Kafka run's clock starts when the producer starts (the workers and the sink already joined their groups)
and stops when the sink has committed the summaries covering every turn — end to end, LTM writes included,
as the embedded run. The tail of each user waits for the idle timeout (``--idle-timeout-s``, twice: the
sensory buffer then STM), the same in both Kafka runs; ``ingest_s`` (raw-turn lag back to 0) is reported
beside it. Consumer lag (worker group on raw turns and segments, sink group on summaries) is sampled every
``--sample-s`` from the broker's end offsets and the groups' committed offsets.

Extraction goes to the OpenAI-compatible test server (``tests/llm_server.py``, standalone) with
``--llm-latency-s`` per answer, or offline (``--offline``). Needs the broker
(``lightmem kafka up``; ``LIGHTMEM_KAFKA__BOOTSTRAP_SERVERS`` to point elsewhere).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_kafka.py --users 4 --sessions 2

Prints a table and one JSON object (``--json-out`` also writes it).
"""

from __future__ import annotations

import argparse
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

from schemas.records import RawTurn  # noqa: E402
from streams.kafka.topics import consumer_lag, group_members, sink_group_id  # noqa: E402
from streams.loaders import load_locomo  # noqa: E402
from tests.conftest_kafka import KafkaEnv, LLMProcess, bootstrap_from_env, run_async  # noqa: E402
from tests.faults.common import corpus, users_on_distinct_partitions  # noqa: E402

LOCOMO = Path(os.environ.get("LIGHTMEM_TEST_DATA", "/work/shared/data")) / "locomo10_dev.json"


def build_input(users: int, sessions: int, partitions: int) -> list[RawTurn]:
    """The first ``sessions`` sessions of a LoCoMo conversation per user, users spread over the partitions."""
    names = users_on_distinct_partitions(users, partitions, prefix="bench-user")
    return corpus(load_locomo(LOCOMO), names, sessions)


def run_embedded(env: KafkaEnv, turns: list[RawTurn]) -> dict[str, Any]:
    from streams.pipeline import EmbeddedPipeline

    async def main() -> dict[str, Any]:
        p = EmbeddedPipeline(env.settings)  # models load here, outside the clock
        try:
            t0 = time.perf_counter()
            users: dict[str, list[RawTurn]] = {}
            for t in turns:
                users.setdefault(t.user_id, []).append(t)
            memories = 0
            for user_turns in users.values():
                for i in range(0, len(user_turns), 64):
                    memories += len((await p.ingest(user_turns[i : i + 64])).memories)
            memories += len((await p.flush()).memories)
            return {"seconds": time.perf_counter() - t0, "memories": memories}
        finally:
            await p.aclose()

    return run_async(main())


class LagSampler(threading.Thread):
    def __init__(self, env: KafkaEnv, every_s: float) -> None:
        super().__init__(daemon=True)
        self.env, self.every_s = env, every_s
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        k = self.env.settings.kafka
        t = k.topics
        while not self.stop.is_set():
            try:
                workers = run_async(consumer_lag(k, k.app_id, [t.raw_turns, t.segments]))
                sink = run_async(consumer_lag(k, sink_group_id(k), [t.summaries]))
                self.samples.append(
                    {
                        "t_s": round(time.perf_counter() - self.t0, 2),
                        "raw_turns": workers[t.raw_turns],
                        "segments": workers[t.segments],
                        "summaries": sink[t.summaries],
                    }
                )
            except Exception as exc:  # noqa: BLE001 - a missed sample is not a failed run
                self.samples.append({"t_s": round(time.perf_counter() - self.t0, 2), "error": repr(exc)})
            self.stop.wait(self.every_s)


def run_kafka(env: KafkaEnv, turns: list[RawTurn], workers: int, sample_s: float) -> dict[str, Any]:
    env.create_topics()
    procs = [env.worker(f"worker-{i + 1}") for i in range(workers)]
    sink = env.sink()
    k = env.settings.kafka
    env.wait_for(
        f"{workers} worker(s) in the group", lambda: run_async(group_members(k, k.app_id)) == workers, 180, 0.5
    )
    env.wait_for("the sink in its group", lambda: run_async(group_members(k, sink_group_id(k))) == 1, 180, 0.5)
    sampler = LagSampler(env, sample_s)
    t0 = time.perf_counter()
    sampler.t0 = t0
    sampler.start()
    env.produce(turns)
    produced_s = time.perf_counter() - t0
    ingest_s: float | None = None

    def raw_lag_zero() -> bool:
        nonlocal ingest_s
        lag = run_async(consumer_lag(k, k.app_id, [k.topics.raw_turns]))
        if sum(lag.values()) == 0 and ingest_s is None:
            ingest_s = time.perf_counter() - t0
        return ingest_s is not None

    env.wait_for("the workers to consume every raw turn", raw_lag_zero, 900, 0.25)
    summaries = env.wait_summaries_cover([t.turn_id for t in turns], timeout_s=900)
    env.wait_sink_caught_up(timeout_s=300)
    total_s = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join(10)
    for p in [*procs, sink]:
        p.terminate()
    good = [s for s in sampler.samples if "error" not in s]
    return {
        "workers": workers,
        "seconds": total_s,
        "ingest_s": ingest_s,
        "produce_s": produced_s,
        "summaries": len({s.summary_id for s in summaries}),
        "summary_records": len(summaries),
        "max_lag": {key: max((s[key] for s in good), default=0) for key in ("raw_turns", "segments", "summaries")},
        "lag_samples": sampler.samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--threshold-tokens", type=int, default=512)
    ap.add_argument("--idle-timeout-s", type=float, default=1.0)
    ap.add_argument("--llm-latency-s", type=float, default=0.0)
    ap.add_argument("--offline", action="store_true", help="extractive mode, no LLM server")
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    bootstrap = bootstrap_from_env()
    from streams.kafka.topics import broker_available

    if not run_async(broker_available(bootstrap)):
        print(f"no Kafka broker at {bootstrap}: start one with `lightmem kafka up`", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    llm = None if args.offline else LLMProcess(base / "llm.log")
    try:
        if llm is not None and args.llm_latency_s:
            llm.control("/control/config", {"latency_s": args.llm_latency_s})
        turns = build_input(args.users, args.sessions, args.partitions)
        kw = {
            "partitions": args.partitions,
            "threshold_tokens": args.threshold_tokens,
            "idle_timeout_s": args.idle_timeout_s,
        }
        url = llm.url if llm else None
        results: dict[str, Any] = {"turns": len(turns), "users": len({t.user_id for t in turns}), **kw}
        env = KafkaEnv.create(bootstrap, url, base, **kw)
        results["embedded"] = run_embedded(env, turns)
        env.close()
        for n in (1, 2):
            env = KafkaEnv.create(bootstrap, url, base, **kw)
            try:
                results[f"kafka_x{n}"] = run_kafka(env, turns, n, args.sample_s)
            finally:
                env.close()
    finally:
        if llm is not None:
            llm.stop()

    n = results["turns"]
    emb, k1, k2 = results["embedded"], results["kafka_x1"], results["kafka_x2"]
    for r in (emb, k1, k2):
        r["turns_per_s"] = n / r["seconds"]
    for r in (k1, k2):
        r["ingest_turns_per_s"] = n / r["ingest_s"] if r["ingest_s"] else None
    results["ratio_kafka1_vs_embedded"] = k1["turns_per_s"] / emb["turns_per_s"]
    results["ratio_kafka2_vs_kafka1"] = k2["turns_per_s"] / k1["turns_per_s"]
    results["ratio_ingest_kafka2_vs_kafka1"] = (
        k2["ingest_turns_per_s"] / k1["ingest_turns_per_s"]
        if k1["ingest_turns_per_s"] and k2["ingest_turns_per_s"]
        else None
    )
    results["cpus"] = os.cpu_count()
    results["load_avg_1m"] = os.getloadavg()[0]

    print(f"\n{n} turns of {results['users']} users, {args.partitions} partitions, {os.cpu_count()} CPUs")
    print(f"{'run':<12}{'seconds':>10}{'turns/s':>10}{'ingest s':>10}{'max lag raw/seg/sum':>22}")
    print(f"{'embedded':<12}{emb['seconds']:>10.1f}{emb['turns_per_s']:>10.2f}{'-':>10}{'-':>22}")
    for name, r in (("kafka x1", k1), ("kafka x2", k2)):
        lag = r["max_lag"]
        lags = f"{lag['raw_turns']}/{lag['segments']}/{lag['summaries']}"
        print(f"{name:<12}{r['seconds']:>10.1f}{r['turns_per_s']:>10.2f}{r['ingest_s'] or 0:>10.1f}{lags:>22}")
    print(
        f"kafka x1 / embedded: {results['ratio_kafka1_vs_embedded']:.2f}   "
        f"kafka x2 / kafka x1: {results['ratio_kafka2_vs_kafka1']:.2f} "
        f"(ingest only: {results['ratio_ingest_kafka2_vs_kafka1'] or float('nan'):.2f})"
    )
    if k1["lag_samples"]:
        mean = statistics.mean(s.get("raw_turns", 0) for s in k1["lag_samples"] if "error" not in s)
        print(f"kafka x1 mean raw-turn lag over the run: {mean:.1f} records")
    slim = {k: v for k, v in results.items()}
    print(json.dumps(slim, default=str))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
