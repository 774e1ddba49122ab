"""The sleep-time compaction prompt: a pure, versioned function paired with its response model.

One call shows ONE new memory (alias ``0``) and up to ``max_candidates_per_call`` of its nearest EARLIER
memories (aliases ``1..n``, most similar first). The LLM decides, for each older memory, ``update`` (rewrite the
older memory so it is correct and complete given the new one), ``delete`` (the older memory is superseded:
duplicated or contradicted by the new one, which is kept) or ``ignore``. It never sees uuids.

Prompt layout (relied upon by tests/test_sleep.py, bench/bench_compaction.py and ``parse_compaction_prompt``)::

    New memory:
    [0] (<YYYY-MM-DD HH:MM>) <text>

    Older memories:
    [1] (<YYYY-MM-DD HH:MM>) <text>
    [2] ...

The time is the latest event time of the memory (when what it states happened or was said), in the timezone it
was recorded with; newlines inside a text are folded into spaces so that every memory is exactly one line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

from schemas.records import MemoryRecord

COMPACTION_PROMPT_VERSION = "compact/v1"
TIME_FORMAT = "%Y-%m-%d %H:%M"
NEW_ALIAS = 0

_Text = Annotated[str, StringConstraints(strip_whitespace=True)]


class MemoryDecision(BaseModel):
    """The LLM's decision about one older memory."""

    model_config = ConfigDict(extra="forbid")

    id: int
    action: Literal["update", "delete", "ignore"]
    text: _Text | None = None
    reason: _Text = ""

    @model_validator(mode="after")
    def _update_has_text(self) -> MemoryDecision:
        if self.action == "update" and not self.text:
            raise ValueError("an 'update' needs the new 'text' of the older memory")
        return self


class CompactionResponse(BaseModel):
    """The JSON object the compaction prompt asks for."""

    model_config = ConfigDict(extra="forbid")

    decisions: list[MemoryDecision]


COMPACTION_SYSTEM_PROMPT = """\
You maintain the long-term memory of a personal assistant. Memories are short standalone statements \
extracted from conversations. You are shown ONE new memory and a few OLDER memories of the same person that \
look similar to it. Keep the memory correct, complete and free of duplicates, and never lose information.

For EACH older memory choose exactly one action:
- "update": the older memory is still useful but must change because of the new memory (a detail changed, \
or the new memory adds to it). Give the complete rewritten older memory in "text": one standalone statement \
that keeps every detail of the older memory that is still true and adds what the new memory says about it.
- "delete": the older memory is superseded by the new memory: it says the same thing (a duplicate), or the \
new memory states a newer fact that replaces it entirely. The new memory is kept.
- "ignore": the memories are about different things, or both should stay as they are.
When unsure, choose "ignore". Never change the new memory itself.

Each memory is shown on its own line as: [id] (date time of the events) text

Return ONE JSON object and nothing else:
{"decisions": [{"id": <id of an older memory>, "action": "update" | "delete" | "ignore",
                "text": "<rewritten memory, only for update>", "reason": "<a few words>"}]}
with one decision per older memory, using only the ids shown under "Older memories"."""


def memory_time(record: MemoryRecord) -> str:
    """The latest event time of a memory, as shown in the prompt."""
    return max(record.event_timestamps).strftime(TIME_FORMAT)


def format_memory_line(alias: int, record: MemoryRecord) -> str:
    """``[<alias>] (<YYYY-MM-DD HH:MM>) <text>`` on a single line."""
    return f"[{alias}] ({memory_time(record)}) {' '.join(record.text.split())}"


def build_compaction_prompt(
    new: MemoryRecord, older: Sequence[MemoryRecord]
) -> tuple[list[dict[str, str]], dict[int, MemoryRecord]]:
    """Messages for ``chat.completions`` and the alias → older-memory map (aliases 1..n in the given order)."""
    if not older:
        raise ValueError("a compaction prompt needs at least one older memory")
    alias_map = dict(enumerate(older, start=1))
    user = (
        "New memory:\n"
        + format_memory_line(NEW_ALIAS, new)
        + "\n\nOlder memories:\n"
        + "\n".join(format_memory_line(alias, rec) for alias, rec in alias_map.items())
        + f"\n\nDecide for each older memory (ids 1..{len(alias_map)}) and answer as JSON:\n"
        + '{"decisions": [{"id": 1, "action": "update", "text": "...", "reason": "..."}]}'
    )
    messages = [
        {"role": "system", "content": COMPACTION_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
    return messages, alias_map


# -- reading a prompt back (test servers, benchmarks) ---------------------------------------------------

_LINE = re.compile(r"^\[(\d+)\] \((\d{4}-\d{2}-\d{2} \d{2}:\d{2})\) (.*)$")


def is_compaction_prompt(messages: Sequence[dict[str, Any]]) -> bool:
    return any(m.get("role") == "system" and m.get("content") == COMPACTION_SYSTEM_PROMPT for m in messages)


def parse_compaction_prompt(
    messages: Sequence[dict[str, Any]],
) -> tuple[tuple[int, str, str], list[tuple[int, str, str]]]:
    """``(new, older)`` of a compaction prompt, each memory as ``(alias, time, text)``."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise ValueError("not a compaction prompt: no user message")
    new: tuple[int, str, str] | None = None
    older: list[tuple[int, str, str]] = []
    section = ""
    for line in users[-1]["content"].splitlines():
        if line in ("New memory:", "Older memories:"):
            section = line
            continue
        match = _LINE.match(line)
        if not match:
            continue
        item = (int(match.group(1)), match.group(2), match.group(3))
        if section == "New memory:":
            new = item
        elif section == "Older memories:":
            older.append(item)
    if new is None or not older:
        raise ValueError("not a compaction prompt: missing the new memory or the older memories")
    return new, older
