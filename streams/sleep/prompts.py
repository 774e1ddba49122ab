"""The sleep-time compaction prompt: a pure, versioned function paired with its response model.

One call decides a BATCH of new memories (targets), each against its nearest EARLIER memories (its candidates).
Every memory in the prompt has one integer alias (``1..n``, targets first, in the order given, then the older
memories that are not targets, each shown once even when several targets share it). For each target the prompt
lists the aliases it is compared with. The LLM names only the pairs to change: ``update`` (rewrite the older
memory so it is correct and complete given the new one), ``delete`` (the older memory is superseded: duplicated
or contradicted by the new one, which is kept); every pair it does not name is left as it is (``ignore``). It
never sees uuids.

Prompt layout (relied upon by ``tests.llm_server``'s reader of this prompt)::

    New memories:
    [1] (<YYYY-MM-DD HH:MM>) <text>
        compare with: 3, 4
    [2] (<YYYY-MM-DD HH:MM>) <text>
        compare with: 1, 4

    Older memories:
    [3] (<YYYY-MM-DD HH:MM>) <text>
    [4] ...

The time is the latest event time of the memory (when what it states happened or was said), in the timezone it
was recorded with; newlines inside a text are folded into spaces so that every memory is exactly one line. A
target may be an older memory of a newer target (``1`` above), and is then listed once, under "New memories".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

from schemas.records import MemoryRecord

COMPACTION_PROMPT_VERSION = "compact/v2"
TIME_FORMAT = "%Y-%m-%d %H:%M"
NEW_HEADER = "New memories:"
OLDER_HEADER = "Older memories:"
COMPARE_PREFIX = "    compare with: "

_Text = Annotated[str, StringConstraints(strip_whitespace=True)]


class PairDecision(BaseModel):
    """The LLM's decision about one (new memory, older memory) pair."""

    model_config = ConfigDict(extra="forbid")

    new: int
    old: int
    action: Literal["update", "delete", "ignore"]
    text: _Text | None = None
    reason: _Text = ""

    @model_validator(mode="after")
    def _update_has_text(self) -> PairDecision:
        if self.action == "update" and not self.text:
            raise ValueError("an 'update' needs the new 'text' of the older memory")
        return self


class CompactionResponse(BaseModel):
    """The JSON object the compaction prompt asks for (items are validated one by one, per target)."""

    model_config = ConfigDict(extra="forbid")

    decisions: list[dict[str, object]]


COMPACTION_SYSTEM_PROMPT = """\
You maintain the long-term memory of a personal assistant. Memories are short standalone statements \
extracted from conversations. You are shown NEW memories of one person and, for each, the OLDER memories \
of the same person that look similar to it ("compare with"). Keep the memory correct, complete and free of \
duplicates, and never lose information.

For each pair (new memory, older memory it is compared with), decide:
- "update": the older memory is still useful but must change because of the new memory (a detail changed, \
or the new memory adds to it). Give the complete rewritten older memory in "text": one standalone statement \
that keeps every detail of the older memory that is still true and adds what the new memory says about it.
- "delete": the older memory is superseded by the new memory: it says the same thing (a duplicate), or the \
new memory states a newer fact that replaces it entirely. The new memory is kept.
- otherwise leave the pair out: the memories are about different things, or both should stay as they are.
When unsure, leave the pair out. Never change a new memory because of an older one, and decide each older \
memory at most once.

Each memory is shown on its own line as: [id] (date time of the events) text

Return ONE JSON object and nothing else, listing only the pairs to update or delete:
{"decisions": [{"new": <id of a new memory>, "old": <id it is compared with>, "action": "update" | "delete",
                "text": "<rewritten older memory, only for update>", "reason": "<a few words>"}]}
Return {"decisions": []} when nothing should change."""


@dataclass(frozen=True)
class PromptTarget:
    """One new memory of a batch and the memories it is compared with (oldest-first order kept by the caller)."""

    record: MemoryRecord
    candidates: tuple[MemoryRecord, ...]


@dataclass(frozen=True)
class BatchPrompt:
    """The messages of one batched call and the alias maps to read its answer back."""

    messages: list[dict[str, str]]
    aliases: dict[int, MemoryRecord]  # every memory shown
    targets: dict[int, MemoryRecord]  # the new memories (a subset of ``aliases``)
    compare: dict[int, tuple[int, ...]]  # target alias → the aliases it is compared with


def memory_time(record: MemoryRecord) -> str:
    """The latest event time of a memory, as shown in the prompt."""
    return max(record.event_timestamps).strftime(TIME_FORMAT)


def format_memory_line(alias: int, record: MemoryRecord) -> str:
    """``[<alias>] (<YYYY-MM-DD HH:MM>) <text>`` on a single line."""
    return f"[{alias}] ({memory_time(record)}) {' '.join(record.text.split())}"


def assign_aliases(targets: Sequence[PromptTarget]) -> dict[str, int]:
    """memory id → alias: targets 1..t in order, then each other candidate once, in order of first use."""
    alias: dict[str, int] = {}
    for t in targets:
        alias.setdefault(t.record.memory_id, len(alias) + 1)
    for t in targets:
        for c in t.candidates:
            alias.setdefault(c.memory_id, len(alias) + 1)
    return alias


def target_lines(target: PromptTarget, alias: dict[str, int]) -> list[str]:
    """The two lines a target adds under "New memories"."""
    compare = ", ".join(str(alias[c.memory_id]) for c in target.candidates)
    return [format_memory_line(alias[target.record.memory_id], target.record), COMPARE_PREFIX + compare]


def build_compaction_prompt(targets: Sequence[PromptTarget]) -> BatchPrompt:
    """Messages for ``chat.completions`` and the alias maps of one batch."""
    if not targets or any(not t.candidates for t in targets):
        raise ValueError("a compaction prompt needs at least one new memory, each with at least one older memory")
    alias = assign_aliases(targets)
    records = {t.record.memory_id: t.record for t in targets}
    for t in targets:
        for c in t.candidates:
            records.setdefault(c.memory_id, c)
    target_ids = {t.record.memory_id for t in targets}
    new_lines = [line for t in targets for line in target_lines(t, alias)]
    older_lines = [format_memory_line(a, records[m]) for m, a in alias.items() if m not in target_ids]
    user = (
        NEW_HEADER
        + "\n"
        + "\n".join(new_lines)
        + ("\n\n" + OLDER_HEADER + "\n" + "\n".join(older_lines) if older_lines else "")
        + "\n\nAnswer as JSON, listing only the pairs to update or delete:\n"
        + '{"decisions": [{"new": 1, "old": 2, "action": "delete", "reason": "..."}]}'
    )
    messages = [
        {"role": "system", "content": COMPACTION_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
    by_alias = {a: records[m] for m, a in alias.items()}
    return BatchPrompt(
        messages=messages,
        aliases=by_alias,
        targets={alias[t.record.memory_id]: t.record for t in targets},
        compare={alias[t.record.memory_id]: tuple(alias[c.memory_id] for c in t.candidates) for t in targets},
    )
