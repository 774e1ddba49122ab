"""One ``Settings`` object, built once at the edge (CLI, API, worker) and passed down.

Every field can be set from the environment with the ``LIGHTMEM_`` prefix and ``__`` between
sections, e.g. ``LIGHTMEM_LLM__BASE_URL=http://127.0.0.1:8000/v1`` or
``LIGHTMEM_COMPRESSION__RATE=0.6``. Library code never reads the environment itself.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PIPELINE_VERSION = "lightmem-streams/0.1"


class CompressionSettings(BaseModel):
    rate: float = Field(default=0.7, gt=0, le=1, description="share of tokens kept per turn")
    llmlingua2_model_path: Path | None = Field(
        default=None, description="local LLMLingua-2 model directory; unset = offline compressor"
    )
    device: str = Field(default="cpu", description="device_map for the LLMLingua-2 model")
    min_words: int = Field(default=4, ge=0, description="turns with at most this many words are kept whole")
    max_tokens: int | None = Field(
        default=160,
        ge=8,
        description="a compressed turn keeps at most about this many tokens (a long turn is compressed harder "
        "than the rate: what a reader is handed stays short); unset = the rate alone",
    )


class SegmentationSettings(BaseModel):
    buffer_tokens: int = Field(default=512, ge=16, description="sensory buffer size in encoder tokens")
    attention_layers: list[int] | None = Field(
        default=None,
        description=(
            "encoder layers averaged for attention boundaries; default [0]: a one-layer pass (≈1/6 of a MiniLM "
            "embedding pass) whose attention follows lexical cohesion between turns; [2] reads mid-depth like "
            "LightMem's layers 8-11 of LLMLingua-2, at three times the cost"
        ),
    )
    sim_threshold_start: float = 0.2
    sim_threshold_step: float = 0.05
    sim_threshold_max: float = 0.5
    window_turns: int = Field(
        default=3, ge=0, description="a similarity cut is kept within ±N turns of an attention boundary"
    )


class STMSettings(BaseModel):
    threshold_tokens: int = Field(default=2048, ge=1, description="flush when buffered segments reach this many tokens")
    idle_timeout_s: float = Field(
        default=300.0, gt=0, description="flush a user's buffer after this long without input"
    )


class LLMSettings(BaseModel):
    base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint; unset = offline extractive mode"
    )
    model: str = "gpt-4o-mini"
    api_key: SecretStr = SecretStr("not-needed")
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0, description="retries after the first attempt")
    backoff_s: float = Field(default=0.5, ge=0, description="first retry delay; doubles each retry")
    max_concurrency: int = Field(default=4, ge=1, description="LLM calls in flight per process")
    temperature: float = 0.0
    max_output_tokens: int = 4096


class EmbeddingSettings(BaseModel):
    model: str | None = Field(
        default=None, description="sentence-transformers model name or path; unset = packaged all-MiniLM-L6-v2"
    )
    batch_size: int = Field(
        default=8, ge=1, description="texts per encoder batch; small batches pad less (about 2x faster than 64 on CPU)"
    )
    device: str = "cpu"


class StoreSettings(BaseModel):
    backend: Literal["edge", "local", "server"] = Field(
        default="edge", description="edge = Qdrant's embedded engine; local = qdrant-client local mode; server = url"
    )
    path: Path = Field(default=Path(".lightmem/qdrant"), description="on-disk storage for edge/local backends")
    url: str | None = Field(default=None, description="Qdrant server URL (switches backend to server)")
    api_key: SecretStr | None = None
    collection: str = "lightmem_memories"
    search_mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    fusion: Literal["dbsf", "rrf"] = Field(
        default="dbsf",
        description="how hybrid search fuses its dense and sparse branches, in the engine (Qdrant's query API): "
        "distribution-based score fusion or reciprocal rank fusion",
    )
    rrf_k: int = Field(default=60, ge=1, description="reciprocal-rank-fusion constant (fusion 'rrf')")
    prefetch: int = Field(default=50, ge=1, description="candidates per branch before fusion")
    prefer_asker: bool = Field(
        default=True,
        description="a first-person query ('when did I ...') also ranks the memories of the user's own turns and "
        "fuses that ranking with the plain one (streams.asker); none is dropped",
    )


class SleepSettings(BaseModel):
    """Sleep-time update (offline consolidation of long-term memory), see ``streams.sleep``."""

    k: int = Field(default=10, ge=1, description="nearest earlier memories compared with each new memory")
    similarity_threshold: float = Field(
        default=0.8, ge=-1, le=1, description="cosine similarity an earlier memory needs to be a candidate"
    )
    duplicate_threshold: float = Field(
        default=0.95, ge=-1, le=1, description="offline rule: at or above this cosine the older memory is a duplicate"
    )
    max_prompt_tokens: int = Field(
        default=8000, ge=256, description="prompt budget of one batched LLM decision call (tokens, cl100k)"
    )
    kinds: list[Literal["fact", "summary"]] = Field(
        default=["fact"], description="memory kinds compacted (each compared only with its own kind)"
    )
    cron_time: str = Field(default="03:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="nightly run, HH:MM")
    timezone: str = Field(default="UTC", description="IANA timezone of cron_time")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as 'Europe/Berlin')") from exc
        return value


class KafkaTopics(BaseModel):
    raw_turns: str = "lightmem.turns.raw"
    segments: str = "lightmem.segments"
    summaries: str = "lightmem.stm.summaries"
    memory_changes: str = "lightmem.memory.changes"
    compaction_requests: str = "lightmem.compaction.requests"
    dead_letters: str = "lightmem.dead.letters"
    control: str = "lightmem.control"
    watermarks: str = "lightmem.compaction.watermarks"
    keys: str = "lightmem.keys"


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    app_id: str = "lightmem"
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    topics: KafkaTopics = KafkaTopics()
    seal_turns: bool = Field(
        default=True,
        description="encrypt turn content on the raw-turn topic with a per-user key (erasure deletes the key)",
    )


class ApiSettings(BaseModel):
    """The memory service (``lightmem serve``) and its clients (CLI, ``MemoryClient``, MCP)."""

    url: str | None = Field(
        default=None, description="a running server's base URL; when set, the CLI and MCP go through it"
    )
    key: SecretStr | None = Field(default=None, description="API key the CLI and MCP send to `url`")
    keys_file: Path | None = Field(default=None, description="key hashes; unset = <data_dir>/api_keys.json")
    host: str = Field(default="127.0.0.1", description="address `lightmem serve` listens on")
    port: int = Field(default=8420, ge=0, le=65535)
    rate_limit: str = Field(default="50/second;1000/minute", description="per key, `limits` notation")
    max_batch_turns: int = Field(default=1000, ge=1, description="turns in one POST /v1/turns")
    max_turn_chars: int = Field(default=32_768, ge=1, description="characters of one turn's content")
    page_size: int = Field(default=100, ge=1, le=1000, description="memories per page of GET /v1/memories")
    search_batch_window_ms: float = Field(
        default=1.0,
        ge=0,
        description="concurrent searches arriving within this window share one encoder pass (searches arriving "
        "while a pass runs share the next one anyway)",
    )
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="intra-op threads of the server's models (0 = torch's default); concurrent requests use the cores",
    )


class WorkerSettings(BaseModel):
    """The stream worker (``lightmem worker``): Faust app options."""

    web_port: int | None = Field(
        default=None, ge=1, le=65535, description="serve Faust's web view on this port; unset = off"
    )
    tick_s: float | None = Field(
        default=None, gt=0, description="idle-flush timer interval; unset = idle timeout/4, at most 1 s"
    )
    standby_replicas: int = Field(default=0, ge=0, description="standby table copies on other workers")
    session_timeout_s: float = Field(default=10.0, gt=0, description="Kafka consumer group session timeout")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="serve /metrics on this port")
    metrics_host: str = Field(default="127.0.0.1", description="address of the /metrics port")


class SinkSettings(BaseModel):
    """The long-term-memory sink (``lightmem sink``)."""

    batch_max: int = Field(default=256, ge=1, description="records per write batch")
    batch_ms: int = Field(default=500, ge=1, description="longest wait for a batch, in milliseconds")
    idle_exit_s: float | None = Field(default=None, gt=0, description="exit after this long without records")
    heartbeat_file: Path | None = Field(default=None, description="file touched on every poll (liveness probes)")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="serve /metrics on this port")
    metrics_host: str = Field(default="127.0.0.1", description="address of the /metrics port")


LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIGHTMEM_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Field(default=Path(".lightmem"), description="local state: DLQ log, cost ledger, eval results")
    compression: CompressionSettings = CompressionSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    stm: STMSettings = STMSettings()
    llm: LLMSettings = LLMSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    store: StoreSettings = StoreSettings()
    sleep: SleepSettings = SleepSettings()
    kafka: KafkaSettings = KafkaSettings()
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    sink: SinkSettings = SinkSettings()
    log_level: LogLevel = Field(default="info", description="log level of the worker and sink processes")

    @model_validator(mode="after")
    def _store_in_data_dir(self) -> Settings:
        """The embedded store lives in ``data_dir/qdrant`` unless ``store.path`` is set itself."""
        if "path" not in self.store.model_fields_set:
            self.store = self.store.model_copy(update={"path": self.data_dir / "qdrant"})
        return self

    @property
    def pipeline_version(self) -> str:
        return PIPELINE_VERSION


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def to_env(settings: BaseModel, prefix: str = "LIGHTMEM_") -> dict[str, str]:
    """The ``LIGHTMEM_*`` environment that rebuilds ``settings`` in another process (``Settings()`` there equals
    ``settings`` here). Nested sections are joined with ``__``; unset optional fields (None) are left out."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        key = f"{prefix}{name.upper()}"
        if isinstance(value, BaseModel):
            env.update(to_env(value, f"{key}__"))
        elif value is not None:
            env[key] = _env_value(value)
    return env
