"""Long-term memory: the Qdrant-backed memory store."""

from streams.ltm.store import MemoryStore, MissingUserError, ScoredMemory, SearchMode, open_store

__all__ = ["MemoryStore", "MissingUserError", "ScoredMemory", "SearchMode", "open_store"]
