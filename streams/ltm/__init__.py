"""Long-term memory: the Qdrant-backed memory store."""

from streams.ltm.owner import StoreBusyError
from streams.ltm.store import MemoryStore, MissingUserError, ScoredMemory, SearchMode, open_store

__all__ = ["MemoryStore", "MissingUserError", "ScoredMemory", "SearchMode", "StoreBusyError", "open_store"]
