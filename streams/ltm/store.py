"""Long-term memory store: one interface (``MemoryStore``), backends picked by ``StoreSettings``.

- ``edge``   — Qdrant's embedded engine (qdrant-edge-py), a shard at ``settings.path / collection`` (default);
- ``local``  — qdrant-client local mode at ``settings.path / "local"``;
- ``server`` — a Qdrant server at ``settings.url`` (setting ``url`` forces this backend).

Every point's id is the memory id; its payload is the ``MemoryRecord`` (json mode) plus
``event_ts_min``/``event_ts_max`` (epoch seconds) for time-range filters and ``updated_ts`` (epoch seconds of
``updated_at``) for ``get_all(updated_after=...)``. Each point carries a
dense vector (``dense``, cosine) and a BM25 sparse vector (``bm25``, IDF applied by the engine
over the user's own memories). Hybrid search fuses both in the engine, in one query (prefetch of both
branches + DBSF or RRF); the congruence tests check that the backends agree.
"""

from __future__ import annotations

from pathlib import Path

from streams.ltm.base import BaseStore, MemoryStore, MissingUserError, ScoredMemory, SearchMode
from streams.ltm.owner import StoreBusyError, StoreOwner
from streams.settings import StoreSettings

__all__ = ["MemoryStore", "MissingUserError", "ScoredMemory", "SearchMode", "StoreBusyError", "open_store"]


def open_store(settings: StoreSettings, dim: int, *, collection: str | None = None) -> MemoryStore:
    """Open (creating if needed) the memory collection on the configured backend."""
    name = collection or settings.collection
    backend = "server" if settings.url else settings.backend
    if backend == "server" and not settings.url:
        raise ValueError("store backend 'server' needs settings.url (LIGHTMEM_STORE__URL)")
    # an on-disk store has one owner process: a second one gets StoreBusyError naming it (see ``owner``)
    owner = None if backend == "server" else StoreOwner(Path(settings.path), name)
    try:
        store = _open(settings, dim, name, backend)
    except BaseException:
        if owner is not None:
            owner.release()
        raise
    store.owner = owner
    return store


def _open(settings: StoreSettings, dim: int, name: str, backend: str) -> BaseStore:
    if backend == "edge":
        from streams.ltm.edge import EdgeStore

        return EdgeStore(settings, dim, name)
    from streams.ltm.client import ClientStore

    return ClientStore(settings, dim, name, server=backend == "server")
