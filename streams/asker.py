"""Whom a question is about. A question in the first person singular ("When did I ...?", "my sister's gift")
asks about the person the memory belongs to, whose turns carry the role ``user`` (``RawTurn.role``, as in chat
transcripts). Search then prefers memories made from that person's own turns over what another party (an
assistant) said on the same subject: their own ranking is fused with the plain one (``streams.ranking.prefer``),
so nothing is dropped and an assistant's answer the question asks about still ranks by its match.

A question that also speaks to the other side ("what did you suggest?", "your list") is about the exchange, not
only the asker, and gets no preference. Conversations between named people (no ``user`` role) are unaffected.
"""

from __future__ import annotations

import re

__all__ = ["SELF_ROLE", "asker_roles"]

SELF_ROLE = "user"
_FIRST_PERSON = re.compile(r"\b(?:i|me|my|mine|myself)\b", re.IGNORECASE)
_SECOND_PERSON = re.compile(r"\b(?:you|your|yours|yourself)\b", re.IGNORECASE)


def asker_roles(query: str) -> tuple[str, ...] | None:
    """The roles whose turns a query asks about (``("user",)`` for a first-person question that does not also
    address the other side), or None."""
    if _FIRST_PERSON.search(query) and not _SECOND_PERSON.search(query):
        return (SELF_ROLE,)
    return None
