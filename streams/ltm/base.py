"""The store contract and the backend-neutral logic both backends share.

Backends implement a handful of primitives over a neutral ``Scope`` (user, time range, kinds);
everything that decides *what* is returned — user checks, payload mapping, search modes, ordering and
tie-breaking — lives here once. Hybrid fusion is the engine's own (Qdrant's query API: prefetch both branches,
fuse with DBSF or RRF); the congruence tests check that the embedded engine and qdrant-client agree.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from schemas.records import MemoryRecord
from streams import metrics
from streams.ltm import sparse
from streams.ltm.owner import StoreOwner
from streams.settings import StoreSettings

SearchMode = Literal["hybrid", "dense", "sparse"]
DENSE = "dense"
SPARSE = "bm25"
ROLE_KEY = "source_turns[].role"  # payload key of the roles of a memory's source turns (nested array)
DERIVED_FIELDS = ("event_ts_min", "event_ts_max", "updated_ts")
UPDATED_TS = "updated_ts"  # epoch seconds of ``updated_at``: the engine-side filter behind ``get_all(updated_after=)``
TIE_SLACK = 8  # extra candidates fetched so equal-score hits at the cut are chosen by id, not engine order


class MissingUserError(ValueError):
    """A store read or write was attempted without a user id."""


@dataclass(frozen=True)
class ScoredMemory:
    record: MemoryRecord
    score: float


@runtime_checkable
class MemoryStore(Protocol):
    def upsert(self, records: Sequence[MemoryRecord], vectors: np.ndarray) -> None: ...

    def search(
        self,
        user_id: str,
        query_text: str,
        query_vector: np.ndarray | None,
        limit: int = 10,
        *,
        mode: SearchMode | None = None,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        kinds: Sequence[str] | None = None,
        roles: Sequence[str] | None = None,
    ) -> list[ScoredMemory]: ...

    def get(self, user_id: str, memory_ids: Sequence[str]) -> list[MemoryRecord]: ...

    def get_all(
        self,
        user_id: str,
        limit: int | None = None,
        *,
        updated_after: datetime | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[MemoryRecord]: ...

    def get_vectors(self, user_id: str, memory_ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def delete(self, user_id: str, memory_ids: Sequence[str]) -> None: ...

    def delete_user(self, user_id: str) -> int: ...

    def count(self, user_id: str | None = None) -> int: ...

    def users(self) -> list[str]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Scope:
    """What a read is restricted to; the user is always set."""

    user_id: str
    ts_from: float | None = None
    ts_to: float | None = None
    kinds: tuple[str, ...] | None = None
    roles: tuple[str, ...] | None = None  # some source turn has one of these roles
    ids: tuple[str, ...] | None = None
    # updated_ts > this, or no updated_ts at all (points written before the field existed): a superset that
    # ``BaseStore.get_all`` narrows exactly in Python
    updated_after: float | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: Mapping[str, Any] | None = None


def require_user(user_id: str | None, op: str) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise MissingUserError(
            f"MemoryStore.{op} needs a non-empty user_id: every read and write is scoped to one user"
        )
    return user_id


def _canonical_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None


def point_ids(memory_ids: Sequence[str]) -> tuple[str, ...]:
    """The ids that can name a point (canonical uuids), de-duplicated in order; others cannot be stored."""
    canonical = (_canonical_uuid(m) for m in memory_ids)
    return tuple(dict.fromkeys(c for c in canonical if c is not None))


def point_row(point: Any, with_vector: bool, vector_name: str) -> tuple[str, dict[str, Any], np.ndarray | None]:
    """(id, payload, dense vector or None) of a point as either engine returns it from a scroll."""
    vec = None
    if with_vector and isinstance(point.vector, dict) and vector_name in point.vector:
        vec = np.asarray(point.vector[vector_name], dtype=np.float32)
    return str(point.id), point.payload or {}, vec


def to_payload(record: MemoryRecord) -> dict[str, Any]:
    payload = record.model_dump(mode="json")
    stamps = [t.timestamp() for t in record.event_timestamps]
    payload["event_ts_min"] = min(stamps)
    payload["event_ts_max"] = max(stamps)
    payload[UPDATED_TS] = record.updated_at.timestamp()
    return payload


def from_payload(payload: Mapping[str, Any]) -> MemoryRecord:
    return MemoryRecord.model_validate({k: v for k, v in payload.items() if k not in DERIVED_FIELDS})


def _ordered(hits: Sequence[Hit]) -> list[Hit]:
    """Best first; equal scores (to float32 precision, which backends differ below) by id."""
    return sorted(hits, key=lambda h: (-float(np.float32(h.score)), h.id))


class BaseStore(ABC):
    """Shared implementation of ``MemoryStore`` over backend primitives."""

    owner: StoreOwner | None = None  # the directory lock of an on-disk store (set by ``open_store``)

    def __init__(self, settings: StoreSettings, dim: int) -> None:
        self.settings = settings
        self.dim = dim

    def release_owner(self) -> None:
        """Give up the on-disk store's lock (backends call this last in ``close``)."""
        if self.owner is not None:
            self.owner.release()

    # -- backend primitives -----------------------------------------------------------
    @abstractmethod
    def _write(
        self, ids: list[str], dense: np.ndarray, docs: list[sparse.Sparse], payloads: list[dict[str, Any]]
    ) -> None: ...

    @abstractmethod
    def _query(
        self, scope: Scope, dense: np.ndarray | None, sp: sparse.Sparse | None, limit: int, with_payload: bool
    ) -> list[list[Hit]]:
        """One ranked hit list per given query (dense first, then sparse), all restricted to ``scope``."""

    @abstractmethod
    def _fused(self, scope: Scope, dense: np.ndarray, sp: sparse.Sparse, depth: int, limit: int) -> list[Hit]:
        """Both branches (``depth`` candidates each, restricted to ``scope``) fused by the engine in one query
        (``settings.fusion``: DBSF, or RRF with ``settings.rrf_k``), best ``limit`` with payloads."""

    @abstractmethod
    def _fetch(self, scope: Scope, with_vector: bool) -> list[tuple[str, Mapping[str, Any], np.ndarray | None]]:
        """All points in ``scope`` (scope.ids narrows it) with payload and optionally the dense vector."""

    @abstractmethod
    def _delete(self, scope: Scope) -> None: ...

    @abstractmethod
    def _count(self, user_id: str | None) -> int: ...

    @abstractmethod
    def users(self) -> list[str]: ...

    @abstractmethod
    def close(self) -> None: ...

    # -- writes -----------------------------------------------------------------------
    def upsert(self, records: Sequence[MemoryRecord], vectors: np.ndarray) -> None:
        if not records:
            return
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape != (len(records), self.dim):
            raise ValueError(f"vectors must have shape ({len(records)}, {self.dim}), got {vecs.shape}")
        for rec in records:
            require_user(rec.user_id, "upsert")
            if _canonical_uuid(rec.memory_id) != rec.memory_id:
                raise ValueError(f"memory_id must be a canonical uuid string (the point id), got {rec.memory_id!r}")
        latest: dict[str, int] = {}
        for i, rec in enumerate(records):
            latest[rec.memory_id] = i  # one point per id; the last occurrence in a batch wins
        rows = sorted(latest.values())
        with metrics.store_write("upsert"):
            self._write(
                [records[i].memory_id for i in rows],
                vecs[rows],
                [sparse.document_vector(records[i].index_text or records[i].text) for i in rows],
                [to_payload(records[i]) for i in rows],
            )

    def delete(self, user_id: str, memory_ids: Sequence[str]) -> None:
        user = require_user(user_id, "delete")
        ids = point_ids(memory_ids)
        if ids:
            with metrics.store_write("delete"):
                self._delete(Scope(user, ids=ids))

    def delete_user(self, user_id: str) -> int:
        user = require_user(user_id, "delete_user")
        before = self._count(user)
        if before:
            with metrics.store_write("delete_user"):
                self._delete(Scope(user))
        return before - self._count(user)

    # -- reads ------------------------------------------------------------------------
    def count(self, user_id: str | None = None) -> int:
        if user_id is not None:
            require_user(user_id, "count")
        return self._count(user_id)

    def get(self, user_id: str, memory_ids: Sequence[str]) -> list[MemoryRecord]:
        user = require_user(user_id, "get")
        ids = point_ids(memory_ids)
        if not ids:
            return []
        found = {pid: from_payload(p) for pid, p, _ in self._fetch(Scope(user, ids=ids), False)}
        return [found[m] for m in ids if m in found]

    def get_all(
        self,
        user_id: str,
        limit: int | None = None,
        *,
        updated_after: datetime | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[MemoryRecord]:
        """The user's memories ordered by (created_at, memory_id), optionally only those with
        ``updated_at > updated_after`` and of ``kinds`` — both filtered by the engine (payload indexes on the
        edge and server backends), so the cost follows what is returned, not the user's whole store.

        Points written before ``updated_ts`` was stored lack it; the engine passes them through and they are
        checked here against their ``updated_at`` (correct, just not indexed — any rewrite of the point, e.g. a
        ``lightmem replay``, adds the field).
        """
        user = require_user(user_id, "get_all")
        if kinds is not None and not kinds:
            return []
        scope = Scope(
            user,
            kinds=tuple(kinds) if kinds is not None else None,
            updated_after=updated_after.timestamp() if updated_after is not None else None,
        )
        records = (from_payload(p) for _, p, _ in self._fetch(scope, False))
        if updated_after is not None:
            records = (r for r in records if r.updated_at > updated_after)
        out = sorted(records, key=lambda r: (r.created_at, r.memory_id))
        return out if limit is None else out[:limit]

    def get_vectors(self, user_id: str, memory_ids: Sequence[str]) -> dict[str, np.ndarray]:
        user = require_user(user_id, "get_vectors")
        ids = point_ids(memory_ids)
        if not ids:
            return {}
        rows = self._fetch(Scope(user, ids=ids), True)
        return {pid: np.asarray(v, dtype=np.float32) for pid, _, v in rows if v is not None}

    def search(
        self,
        user_id: str,
        query_text: str,
        query_vector: np.ndarray | None,
        limit: int = 10,
        *,
        mode: SearchMode | None = None,
        time_from: datetime | None = None,
        time_to: datetime | None = None,
        kinds: Sequence[str] | None = None,
        roles: Sequence[str] | None = None,
    ) -> list[ScoredMemory]:
        """Top ``limit`` memories of one user, best first.

        ``dense`` ranks by cosine to ``query_vector``; ``sparse`` by BM25 over ``query_text`` (IDF over the user's
        own memories); ``hybrid`` fuses both (``settings.prefetch`` candidates each) in the engine, in one query
        (``settings.fusion``: DBSF by default, or RRF), and scores are the fused scores. Hybrid without a query
        vector, or with a text of no searchable terms, degrades to the one branch it has. Equal scores are
        ordered by memory id. Time bounds keep memories whose events overlap
        [time_from, time_to]; ``kinds`` keeps those kinds; ``roles`` those made from a turn of one of these roles
        (``source_turns``: memories written before source turns were kept match none).
        """
        user = require_user(user_id, "search")
        mode = mode or self.settings.search_mode
        if limit <= 0:
            return []
        if mode not in ("hybrid", "dense", "sparse"):
            raise ValueError(f"unknown search mode {mode!r}")
        scope = Scope(
            user,
            ts_from=time_from.timestamp() if time_from is not None else None,
            ts_to=time_to.timestamp() if time_to is not None else None,
            kinds=tuple(kinds) if kinds is not None else None,
            roles=tuple(roles) if roles is not None else None,
        )
        dense = self._dense_query(query_vector) if mode != "sparse" else None
        if mode == "dense" and dense is None:
            raise ValueError("dense search needs a query_vector")
        sp = sparse.query_vector(query_text or "") if mode != "dense" else None
        if sp is not None and not sp:
            sp = None  # no searchable terms (empty or only stopwords)
        if dense is None and sp is None:
            return []
        if mode != "hybrid" or dense is None or sp is None:
            (hits,) = self._query(scope, dense, sp, limit + TIE_SLACK, True)
            return [ScoredMemory(from_payload(h.payload or {}), h.score) for h in _ordered(hits)[:limit]]
        depth = max(self.settings.prefetch, limit)
        fused = self._fused(scope, dense, sp, depth, limit + TIE_SLACK)
        return [ScoredMemory(from_payload(h.payload or {}), h.score) for h in _ordered(fused)[:limit]]

    def _dense_query(self, query_vector: np.ndarray | None) -> np.ndarray | None:
        if query_vector is None:
            return None
        vec = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise ValueError(f"query_vector must have {self.dim} dimensions, got {vec.shape[0]}")
        return vec
