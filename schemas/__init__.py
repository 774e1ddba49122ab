"""Versioned topic records of LightMem Streams.

Every Kafka topic (and every embedded-mode log) carries exactly one of these models.
They are frozen and reject unknown fields; ``schema_version`` is bumped on any change
that old readers could not parse. JSON Schema files generated from them live in
``schemas/json/`` and a test fails when they are stale (``lightmem schemas --write``).
"""

from schemas.records import (
    SCHEMA_MODELS,
    CompactionRequest,
    CompressedTurn,
    ControlRecord,
    DeadLetter,
    Fact,
    MemoryChange,
    MemoryRecord,
    RawTurn,
    SensoryBufferState,
    SourceTurn,
    StageCost,
    STMBufferState,
    STMSummary,
    SummarySentence,
    TopicSegment,
)

__all__ = [
    "SCHEMA_MODELS",
    "CompactionRequest",
    "CompressedTurn",
    "ControlRecord",
    "DeadLetter",
    "Fact",
    "MemoryChange",
    "MemoryRecord",
    "RawTurn",
    "SensoryBufferState",
    "STMBufferState",
    "STMSummary",
    "SourceTurn",
    "SummarySentence",
    "StageCost",
    "TopicSegment",
]
