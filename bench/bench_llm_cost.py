"""The LLM bill per conversation: extraction AND sleep-time, in LLM mode, through the real ``openai`` client.

For each LoCoMo conversation (and each STM threshold of ``--thresholds``): a fresh embedded memory ingests the
conversation with extraction in LLM mode, every question is searched (recall before), one sleep-time
compaction runs in LLM mode, every question is searched again (recall after). The LLM is the deterministic
OpenAI-compatible test server (``tests.llm_server``, started in-process unless ``--base-url`` names one): it
extracts one fact per turn that states something (the product's content test: no fact for "Bye Nate!") and
deletes near-duplicates (same speaker, nearly the same words) during compaction. Calls and tokens are what the
client counted (the server reports ``usage``), so the bill is the product's, but the answers are not a real
model's: a real LLM writes fewer, merged facts, and its output tokens differ.

Recall is evidence recall@k over the ordinary questions (LoCoMo categories 1-4), crediting a memory only with
the turns it states: a fact with the turns it cites; a summary with none (it still takes its place in the top
k). A compaction that loses evidence shows up as recall after < recall before.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_llm_cost.py --data /work/shared/data/locomo10_dev.json
    ... --thresholds 256,512,1024,2048     # the extraction grid (recall per call)

Prints one row per conversation and threshold, and one JSON object (``--json-out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.records import StageCost  # noqa: E402
from streams.api import Memory  # noqa: E402
from streams.eval.metrics import aggregate, question_eval  # noqa: E402
from streams.loaders import Conversation, load_locomo  # noqa: E402
from streams.settings import LLMSettings, Settings, StoreSettings  # noqa: E402
from streams.stages import Stages  # noqa: E402


@dataclass(frozen=True)
class Credited:
    """A retrieved memory as the recall metric sees it: its text and the turns it states."""

    text: str
    source_turn_ids: tuple[str, ...]


def recall(mem: Memory, conv: Conversation, k: int) -> float:
    """Mean evidence recall@k of the ordinary questions, facts credited with their cited turns, summaries none."""
    questions = []
    for qa in conv.qa:
        hits = mem.search(qa.question, user_id=conv.user_id, limit=k)
        items = [
            Credited(h.record.text, tuple(h.record.source_turn_ids) if h.record.kind == "fact" else ()) for h in hits
        ]
        questions.append(question_eval(qa, items))
    value = aggregate(questions, [k])["overall"][f"evidence_recall@{k}"]
    return float(value or 0.0)


def _delta(after: StageCost | None, before: StageCost | None) -> dict[str, int]:
    def get(c: StageCost | None, name: str) -> int:
        return int(getattr(c, name)) if c is not None else 0

    return {n: get(after, n) - get(before, n) for n in ("calls", "input_tokens", "output_tokens")}


def run_one(conv: Conversation, threshold: int, base: Settings, stages: Stages, args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-llm-cost-"))
    settings = base.model_copy(
        update={
            "data_dir": root / "state",
            "store": StoreSettings(path=root / "qdrant"),
            "stm": base.stm.model_copy(update={"threshold_tokens": threshold}),
        }
    )
    try:
        with Memory(settings, stages=stages) as mem:
            t0 = time.perf_counter()
            before = mem.costs().get("extraction")
            for i in range(0, len(conv.turns), args.chunk_turns):
                mem.add_turns(conv.turns[i : i + args.chunk_turns])
            mem.flush(conv.user_id)
            extraction = _delta(mem.costs().get("extraction"), before)
            ingest_s = time.perf_counter() - t0
            memories_before = len(mem.get_all(conv.user_id))
            recall_before = recall(mem, conv, args.k)
            t1 = time.perf_counter()
            run = None
            sleep = {"calls": 0, "input_tokens": 0, "output_tokens": 0}
            memories_after, recall_after = memories_before, recall_before
            if args.compact:
                report = mem.compact([conv.user_id])
                sleep = {n: int(getattr(report.cost, n)) for n in ("calls", "input_tokens", "output_tokens")}
                memories_after = len(mem.get_all(conv.user_id))
                recall_after = recall(mem, conv, args.k)
                run = report.users[0] if report.users else None
            compact_s = time.perf_counter() - t1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = {n: extraction[n] + sleep[n] for n in extraction}
    return {
        "conversation": conv.user_id,
        "turns": len(conv.turns),
        "questions": len(conv.qa),
        "threshold": threshold,
        "compacted": args.compact,
        "extraction": extraction,
        "sleep": sleep,
        "total": total,
        "memories_before": memories_before,
        "memories_after": memories_after,
        "targets": run.targets if run else 0,
        "candidates": run.candidates if run else 0,
        "batches": run.batches if run else 0,
        "actions": dict(run.actions) if run else {},
        "dead_letters": len(run.dead_letters) if run else 0,
        f"recall@{args.k}_before": round(recall_before, 4),
        f"recall@{args.k}_after": round(recall_after, 4),
        "ingest_s": round(ingest_s, 1),
        "compact_s": round(compact_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, required=True, help="a LoCoMo file (locomo10*.json)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    parser.add_argument("--only", default=None, help="only these conversations (sample ids, comma-separated)")
    parser.add_argument(
        "--thresholds", default=None, help="STM thresholds (tokens), comma-separated; default: the setting"
    )
    parser.add_argument("--k", type=int, default=10, help="recall@k")
    parser.add_argument(
        "--base-url", default=None, help="an OpenAI-compatible endpoint; default: the in-process test server"
    )
    parser.add_argument("--model", default="test-model")
    parser.add_argument(
        "--no-compact", dest="compact", action="store_false", help="extraction only (the threshold grid)"
    )
    parser.add_argument("--chunk-turns", type=int, default=64, help="turns per add_turns call")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    convs = load_locomo(args.data)[: args.limit]
    if args.only:
        convs = [c for c in convs if c.user_id in set(args.only.split(","))]
    server = None
    url = args.base_url
    if url is None:
        from tests.llm_server import LLMServer

        server = LLMServer().start()
        url = server.url
    base = Settings()
    base = base.model_copy(
        update={"llm": LLMSettings(**{**base.llm.model_dump(), "base_url": url, "model": args.model})}
    )
    thresholds = [int(t) for t in args.thresholds.split(",")] if args.thresholds else [base.stm.threshold_tokens]
    stages = Stages(base)  # one encoder, compressor and LLM client for every run
    rows = []
    try:
        head = (
            f"{'conversation':<12} {'turns':>5} {'thr':>5} | {'extr calls':>10} {'extr in':>8} {'extr out':>8} | "
            f"{'sleep calls':>11} {'sleep in':>8} {'sleep out':>9} | {'calls':>5} {'input':>7} {'output':>7} | "
            f"{'mem':>5} {'→':>5} | {'R@k before':>10} {'after':>6}"
        )
        print(head, flush=True)
        for threshold in thresholds:
            for conv in convs:
                r = run_one(conv, threshold, base, stages, args)
                rows.append(r)
                e, s, t = r["extraction"], r["sleep"], r["total"]
                before, after = r[f"recall@{args.k}_before"], r[f"recall@{args.k}_after"]
                print(
                    f"{r['conversation']:<12} {r['turns']:>5} {threshold:>5} | {e['calls']:>10} {e['input_tokens']:>8} "
                    f"{e['output_tokens']:>8} | {s['calls']:>11} {s['input_tokens']:>8} {s['output_tokens']:>9} | "
                    f"{t['calls']:>5} {t['input_tokens']:>7} {t['output_tokens']:>7} | {r['memories_before']:>5} "
                    f"{r['memories_after']:>5} | {before:>10.4f} {after:>6.4f}",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    out = {"k": args.k, "model": args.model, "data": str(args.data), "rows": rows}
    print(json.dumps(out))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
