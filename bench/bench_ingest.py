"""Embedded ingest throughput against the bare model work on the same texts, measured in one run.

bare      = compress every turn (the configured compressor) + embed every compressed turn (MiniLM):
            the unavoidable model work of any pipeline that stores compressed turns.
embedded  = the full embedded runner (compression, segmentation with its attention pass, STM,
            extraction in the configured mode, embedding, Qdrant upsert, flush) into a fresh store.

The two are interleaved over several rounds so machine load hits both alike; the ratio of the
medians is reported. Usage: python bench/bench_ingest.py [--conversations conv-30,conv-26] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from streams.api import Memory  # noqa: E402
from streams.loaders import load_locomo  # noqa: E402
from streams.pipeline import Stages  # noqa: E402
from streams.settings import Settings, StoreSettings  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo10_dev.json"


def bare(stages: Stages, turns) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    texts = stages.compressor.compress_texts([t.content for t in turns], stages.settings.compression.rate)
    stages.encoder.embed(texts)
    return time.perf_counter() - t0


def embedded(settings: Settings, stages: Stages, turns, workdir: Path) -> tuple[float, dict]:  # noqa: ANN001
    stages.embed._cache.clear()  # no carry-over between rounds
    s = settings.model_copy(update={"data_dir": workdir, "store": StoreSettings(path=workdir / "qdrant")})
    m = Memory(s, stages=stages)
    try:
        t0 = time.perf_counter()
        for i in range(0, len(turns), 64):
            m.add_turns(turns[i : i + 64])
        m.flush()
        wall = time.perf_counter() - t0
        costs = {k: round(v.seconds, 2) for k, v in m.costs().items()}
        costs["memories"] = sum(m.pipeline.store.count(u) for u in {t.user_id for t in turns})
    finally:
        m.close()
    return wall, costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--conversations", default="conv-30,conv-26")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    wanted = args.conversations.split(",")
    turns = [t for c in load_locomo(args.data) if c.user_id in wanted for t in c.turns]
    settings = Settings()
    stages = Stages(settings)
    bare(stages, turns[:64])  # warm-up: model load, kernels
    bare_s, emb_s, breakdown = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            bare_s.append(bare(stages, turns))
            wall, costs = embedded(settings, stages, turns, Path(tmp) / f"round{r}")
            emb_s.append(wall)
            breakdown.append(costs)
            print(
                f"round {r}: bare {len(turns) / bare_s[-1]:.1f} turns/s, embedded {len(turns) / wall:.1f} turns/s, "
                f"stages {costs}"
            )
    bare_tps = len(turns) / statistics.median(bare_s)
    emb_tps = len(turns) / statistics.median(emb_s)
    result = {
        "turns": len(turns),
        "conversations": wanted,
        "compressor": stages.compressor.name,
        "extractor": stages.extractor.name,
        "rate": settings.compression.rate,
        "bare_turns_per_s": round(bare_tps, 1),
        "embedded_turns_per_s": round(emb_tps, 1),
        "ratio_embedded_over_bare": round(emb_tps / bare_tps, 3),
        "target": 0.70,
        "rounds": args.rounds,
        "stage_seconds_last_round": breakdown[-1],
    }
    print(f"\nembedded ingest / bare compress+embed = {result['ratio_embedded_over_bare']:.2f} (target ≥ 0.70)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
