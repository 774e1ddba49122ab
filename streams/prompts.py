"""Prompts: pure, versioned functions paired with their response model.

The short-term-memory extraction prompt turns ONE batch of topic segments (an STM flush) into a
topic summary plus standalone facts. The LLM never sees uuids: each turn is shown with a small
integer alias (``[1]``, ``[2]`` ...) and cites those aliases as a fact's sources; the caller maps them
back to turn ids with the alias map returned beside the messages.

Turn line format (relied upon by tests/llm_server.py and by anyone comparing runs)::

    [<alias>] (<YYYY-MM-DD HH:MM>) <speaker or role>: <compressed_text>

The time is the turn's event time in the timezone it was recorded with; newlines inside a turn's text
are folded into spaces so that every turn is exactly one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from schemas.records import CompressedTurn, TopicSegment

EXTRACTION_PROMPT_VERSION = "extract/v2"

TIME_FORMAT = "%Y-%m-%d %H:%M"

_Text = Annotated[str, StringConstraints(strip_whitespace=True)]


class ExtractedFact(BaseModel):
    """One fact as the LLM returns it: its text and the aliases of the turns it came from."""

    model_config = ConfigDict(extra="forbid")

    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    sources: list[int]


class ExtractionResponse(BaseModel):
    """The JSON object the extraction prompt asks for.

    ``summary`` is a list of sentences, each with the aliases of the turns it draws on; a plain string (an
    endpoint that ignores the format) is accepted and then cites no turn.
    """

    model_config = ConfigDict(extra="forbid")

    summary: _Text | list[ExtractedFact]
    facts: list[ExtractedFact]

    @property
    def summary_text(self) -> str:
        if isinstance(self.summary, str):
            return self.summary
        return " ".join(s.text for s in self.summary)


EXTRACTION_SYSTEM_PROMPT = """\
You are the short-term memory of a personal assistant. You read a stretch of conversation between \
people (or between a user and an assistant) and write down what is worth remembering later.

Each turn is shown on its own line as: [alias] (date time) speaker: text
The texts were compressed to save tokens, so some small words may be missing; read them for meaning.

Return ONE JSON object and nothing else, with exactly these keys:
  "summary": a list of one to three sentences {"text": "...", "sources": [aliases]} naming the topic(s) of
    this stretch of conversation, who took part and what was said; "sources" lists the aliases of the turns
    each sentence draws on.
  "facts": a list of objects {"text": "...", "sources": [aliases]}.

Rules for facts:
- Each fact is a single, standalone statement that is understandable without the conversation:
  replace pronouns (I, you, he, she, they, it, this) with the names or things they refer to, and keep
  people's names exactly as written.
- Turn relative times ("yesterday", "last week", "next month") into absolute dates using the date of the
  turn they were said in, e.g. "on 2023-05-07" or "in the week before 2023-05-08".
- Keep concrete details: names, places, numbers, dates, preferences, plans, feelings, decisions.
- "sources" lists the integer aliases of ALL the turns the fact comes from, and only aliases shown in
  the conversation. Never invent an alias.
- Write at least one fact whenever the conversation contains anything; do not repeat the same fact.
- Write in the language of the conversation."""


def format_turn_line(alias: int, turn: CompressedTurn) -> str:
    """``[<alias>] (<YYYY-MM-DD HH:MM>) <speaker or role>: <compressed_text>`` on a single line."""
    who = " ".join((turn.speaker or turn.role).split()) or turn.role
    text = " ".join(turn.compressed_text.split())
    return f"[{alias}] ({turn.timestamp.strftime(TIME_FORMAT)}) {who}: {text}"


def build_extraction_prompt(
    segments: Sequence[TopicSegment],
) -> tuple[list[dict[str, str]], dict[int, CompressedTurn]]:
    """Messages for ``chat.completions`` and the alias → turn map (aliases 1..n in batch order)."""
    alias_map: dict[int, CompressedTurn] = {}
    lines: list[str] = []
    for segment in segments:
        for turn in segment.turns:
            alias = len(alias_map) + 1
            alias_map[alias] = turn
            lines.append(format_turn_line(alias, turn))
    user = (
        "Conversation:\n"
        + "\n".join(lines)
        + "\n\n"
        + "Write the topic summary and the standalone facts of this conversation as JSON:\n"
        + '{"summary": [{"text": "...", "sources": [1, 3]}], "facts": [{"text": "...", "sources": [1, 2]}]}'
    )
    messages = [
        {"role": "system", "content": EXTRACTION_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
    return messages, alias_map
