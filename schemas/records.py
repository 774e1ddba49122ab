"""Pydantic models, one per topic record.

Conventions:
- all models are frozen and ``extra="forbid"``;
- every model carries ``schema_version`` (a ``Literal`` so a record of another
  version fails validation loudly instead of being half-read);
- every datetime is timezone-aware (``AwareDatetime``);
- ids are strings: uuid5 values for derived records (see ``streams.ids``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .limits import MAX_TURN_BYTES, Role, SessionId, Speaker, TurnContent, UserId

NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class Record(BaseModel):
    """Base of every topic record: frozen, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RawTurn(Record):
    """One conversation turn as produced by a client. Topic ``turns.raw`` (the log of record)."""

    schema_version: Literal[1, 2] = 2
    turn_id: NonEmpty = Field(description="uuid5 of (user_id, session_id, seq); see streams.ids.turn_id")
    user_id: UserId
    session_id: SessionId
    seq: int = Field(ge=0, description="position of the turn inside its session")
    role: Role = Field(description="any role: user, assistant, a speaker's name, tool, ...")
    speaker: Speaker | None = Field(default=None, description="display name of who spoke, when known")
    content: TurnContent = Field(description="the turn's text, at most 128 KiB of UTF-8 (schemas.limits)")
    timestamp: AwareDatetime = Field(description="event time of the turn")
    source_id: str | None = Field(default=None, description="id in the source dataset (e.g. LoCoMo dia_id)")
    sealed: str | None = Field(
        default=None,
        max_length=4 * MAX_TURN_BYTES,
        description="on the raw-turn topic: the content encrypted with the user's key (a Fernet token); "
        "content is empty then (crypto-shredding: erasing the key makes the stored turn unreadable)",
    )
    key_id: str | None = Field(default=None, description="id of the user's key that sealed the content")

    @model_validator(mode="after")
    def _sealed_has_a_key(self) -> RawTurn:
        if (self.sealed is None) != (self.key_id is None):
            raise ValueError("sealed and key_id go together")
        if self.sealed is not None and self.content:
            raise ValueError("a sealed turn carries its content only encrypted (content must be empty)")
        return self


class CompressedTurn(Record):
    """A raw turn after sensory compression; the raw text is always kept beside the compressed text."""

    schema_version: Literal[1] = 1
    turn_id: NonEmpty
    user_id: UserId
    session_id: NonEmpty
    seq: int = Field(ge=0)
    role: NonEmpty
    speaker: str | None = None
    timestamp: AwareDatetime
    source_id: str | None = None
    raw_text: str
    compressed_text: str
    compressor: NonEmpty = Field(description="which compressor ran, e.g. 'llmlingua2' or 'offline-selfinfo'")
    rate: float = Field(gt=0, le=1, description="target keep rate")
    raw_tokens: int = Field(ge=0, description="tokens of raw_text (cl100k_base)")
    compressed_tokens: int = Field(ge=0, description="tokens of compressed_text (cl100k_base)")
    encoder_tokens: int = Field(ge=0, description="encoder-model tokens of compressed_text (sensory buffer unit)")


class TopicSegment(Record):
    """A run of turns on one topic, cut by the sensory segmenter. Topic ``segments``."""

    schema_version: Literal[1] = 1
    segment_id: NonEmpty = Field(description="uuid5 of the user and the turn ids it holds")
    user_id: UserId
    turns: list[CompressedTurn] = Field(min_length=1)
    tokens: int = Field(ge=0, description="cl100k_base tokens of the compressed texts")
    boundary: Literal["attention+similarity", "similarity", "single", "oversize", "flush"] = Field(
        description="why the segment ended"
    )


class Fact(Record):
    """One standalone fact with its provenance."""

    text: NonEmpty
    source_turn_ids: list[NonEmpty] = Field(min_length=1)
    source_timestamps: list[AwareDatetime] = Field(min_length=1)
    session_ids: list[NonEmpty] = Field(min_length=1, description="sessions of the source turns, in order")
    index_text: str | None = Field(
        default=None, description="what the search index reads when it differs from text (e.g. the raw turn)"
    )


class SourceTurn(Record):
    """A turn a memory was made from, as it was said (its raw text): kept with the memory so that reading the
    memory's provenance never needs the (crypto-shredded) raw-turn log. Erased with the memory."""

    turn_id: NonEmpty
    session_id: NonEmpty
    seq: int = Field(ge=0)
    role: NonEmpty
    speaker: str | None = None
    timestamp: AwareDatetime
    text: str = Field(description="the turn's raw text")


class SummarySentence(Record):
    """One sentence of a topic summary with the turns it states."""

    text: NonEmpty
    source_turn_ids: list[NonEmpty] = Field(min_length=1)


class STMSummary(Record):
    """Output of one short-term-memory flush: ONE extraction call. Topic ``stm.summaries``."""

    schema_version: Literal[1, 2] = 2
    summary_id: NonEmpty = Field(description="uuid5 of the user and all turn ids of the batch")
    user_id: UserId
    session_ids: list[NonEmpty] = Field(min_length=1)
    topic_id: NonEmpty = Field(description="id of the first segment of the batch")
    segment_ids: list[NonEmpty] = Field(min_length=1)
    turn_ids: list[NonEmpty] = Field(min_length=1)
    summary: NonEmpty
    summary_sentences: list[SummarySentence] = Field(
        default_factory=list,
        description="the summary's sentences, each citing the turns it states (a summary memory is credited with "
        "those turns only)",
    )
    facts: list[Fact]
    extractor: NonEmpty = Field(
        description="'llm:<model>/<prompt version>' (e.g. 'llm:gpt-4o-mini/extract/v1'; older records: 'llm:<model>') "
        "or 'extractive' (offline mode)"
    )
    created_at: AwareDatetime
    turns: list[SourceTurn] = Field(
        default_factory=list,
        description="the batch's turns with their raw text, in turn_ids order (v2; v1 summaries carry none)",
    )


class MemoryRecord(Record):
    """A long-term memory point (payload stored in Qdrant, plus its id)."""

    schema_version: Literal[1, 2] = 2
    memory_id: NonEmpty = Field(description="uuid5 of source turn ids and the fact's position")
    user_id: UserId
    session_ids: list[NonEmpty] = Field(min_length=1)
    text: NonEmpty
    kind: Literal["fact", "summary"]
    source_turn_ids: list[NonEmpty] = Field(min_length=1, description="the turns the text states")
    source_turns: list[SourceTurn] = Field(
        default_factory=list,
        description="those turns with their raw text, in source_turn_ids order (v2; memories written by v1 carry none)",
    )
    index_text: str | None = Field(
        default=None, description="what the search index reads when it differs from text (e.g. the raw turn)"
    )
    event_timestamps: list[AwareDatetime] = Field(min_length=1)
    topic_id: NonEmpty
    summary_id: NonEmpty
    pipeline_version: NonEmpty
    version: int = Field(default=1, ge=1, description="bumped by each sleep-time update")
    created_at: AwareDatetime
    updated_at: AwareDatetime


class MemoryChange(Record):
    """A sleep-time decision applied to one memory. Topic ``memory.changes`` (also the audit log)."""

    schema_version: Literal[1] = 1
    change_id: NonEmpty
    memory_id: NonEmpty
    user_id: UserId
    action: Literal["update", "delete", "ignore", "revert"]
    old_text: str | None = None
    new_text: str | None = None
    old_version: int | None = None
    new_version: int | None = None
    reason: str = ""
    caused_by: list[str] = Field(default_factory=list, description="memory ids that triggered the change")
    reverts: str | None = Field(default=None, description="change_id undone by a 'revert'")
    old_record: MemoryRecord | None = Field(
        default=None, description="the memory before the change (kept for deletes, so history and revert work)"
    )
    new_record: MemoryRecord | None = Field(
        default=None, description="the memory after an update or revert (applied as is, re-embedded); None = absent"
    )
    model: NonEmpty = Field(
        description="'llm:<model>/<prompt version>' (e.g. 'llm:gpt-4o-mini/compact/v1'; older records: "
        "'llm:<model>'), 'offline-rule', 'exact-rule' (identical text, no call) or 'operator' (a revert)"
    )
    pipeline_version: NonEmpty
    at: AwareDatetime


class UserKey(Record):
    """A user's content key (crypto-shredding). Topic ``keys`` (compacted, key ``<user>/<key id>``); erasing a
    user tombstones their keys, so the turns they sealed can no longer be read anywhere."""

    schema_version: Literal[1] = 1
    user_id: UserId
    key_id: NonEmpty
    key: NonEmpty = Field(description="Fernet key (urlsafe base64, 32 bytes)")
    created_at: AwareDatetime


class WatermarkRecord(Record):
    """A user's compaction watermark. Topic ``watermarks`` (compacted, keyed by user; a tombstone on erasure)."""

    schema_version: Literal[1] = 1
    user_id: UserId
    mark: AwareDatetime | None = Field(default=None, description="memories updated after it are new to compaction")
    completed_at: AwareDatetime


class CompactionRequest(Record):
    """Ask for a sleep-time update of one user's memories. Topic ``compaction.requests``."""

    schema_version: Literal[1] = 1
    request_id: NonEmpty
    user_id: UserId
    watermark: AwareDatetime | None = Field(default=None, description="consider memories changed after this")
    requested_at: AwareDatetime


class ControlRecord(Record):
    """Operator commands keyed by user. Topic ``control``."""

    schema_version: Literal[1] = 1
    action: Literal["erase_user"]
    user_id: UserId
    requested_at: AwareDatetime


class DeadLetter(Record):
    """A record a stage could not process, with why. Topic ``dead.letters`` (embedded: a local log)."""

    schema_version: Literal[1] = 1
    dlq_id: NonEmpty
    stage: Literal["ingest", "compress", "segment", "stm", "extract", "embed", "sink", "compact", "control"]
    reason: NonEmpty
    error_type: NonEmpty
    attempts: int = Field(default=1, ge=0)
    key: str | None = Field(default=None, description="record key (user id) when known")
    payload: str = Field(description="the original payload, verbatim (JSON text or bytes decoded as latin-1)")
    at: AwareDatetime


class StageCost(Record):
    """Cost of one stage over a unit of work (a batch, a run)."""

    schema_version: Literal[1] = 1
    stage: Literal["compression", "segmentation", "extraction", "embedding", "upsert", "compaction"]
    calls: int = Field(default=0, ge=0, description="LLM calls (0 for local models)")
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    seconds: float = Field(default=0.0, ge=0)
    items: int = Field(default=0, ge=0, description="records processed")


SeqMarks = dict[str, int]


class SensoryBufferState(Record):
    """Per-user sensory buffer (Faust table value; changelogged)."""

    schema_version: Literal[1, 2] = 2
    user_id: UserId
    turns: list[CompressedTurn] = Field(default_factory=list)
    encoder_tokens: int = Field(default=0, ge=0)
    last_seq: SeqMarks = Field(
        default_factory=dict,
        description="highest seq accepted per session (the most recent sessions): a turn at or below it is a "
        "redelivery and is dropped, so a re-produced turn never enters the buffer twice",
    )


class STMBufferState(Record):
    """Per-user short-term buffer of segments (Faust table value; changelogged)."""

    schema_version: Literal[1, 2] = 2
    user_id: UserId
    segments: list[TopicSegment] = Field(default_factory=list)
    tokens: int = Field(default=0, ge=0)
    last_event_at: AwareDatetime | None = Field(default=None, description="wall time of the last add")
    last_seq: SeqMarks = Field(
        default_factory=dict,
        description="highest seq handed to STM per session (the most recent sessions): turns at or below it are "
        "dropped from a segment, so no turn enters two extraction batches",
    )


class SensoryTableRow(Record):
    """A row of the worker's ``sensory`` table (key: user id; value: this JSON; changelogged)."""

    schema_version: Literal[1] = 1
    state: SensoryBufferState
    offset: int = Field(default=-1, ge=-1, description="last raw-turn offset applied to the state")
    seen_at: float = Field(default=0.0, ge=0, description="epoch seconds (stream time) of the user's last turn")
    pending: SeqMarks = Field(
        default_factory=dict, description="marks of the turns an idle flush sent to STM, until STM has taken them"
    )


class STMTableRow(Record):
    """A row of the worker's ``stm`` table (key: user id; value: this JSON; changelogged)."""

    schema_version: Literal[1] = 1
    state: STMBufferState
    offset: int = Field(default=-1, ge=-1, description="last segment offset applied to the state")
    recent: list[str] = Field(default_factory=list, description="ids of the last segments handed to extraction")


SCHEMA_MODELS: dict[str, type[Record]] = {
    "raw_turn": RawTurn,
    "compressed_turn": CompressedTurn,
    "topic_segment": TopicSegment,
    "stm_summary": STMSummary,
    "memory_record": MemoryRecord,
    "memory_change": MemoryChange,
    "compaction_request": CompactionRequest,
    "control_record": ControlRecord,
    "dead_letter": DeadLetter,
    "stage_cost": StageCost,
    "sensory_buffer_state": SensoryBufferState,
    "stm_buffer_state": STMBufferState,
    "sensory_table_row": SensoryTableRow,
    "stm_table_row": STMTableRow,
    "user_key": UserKey,
    "watermark_record": WatermarkRecord,
}
