"""Backend ``edge``: Qdrant's embedded engine (qdrant-edge-py), one shard directory on disk."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from streams.ltm import sparse
from streams.ltm.base import DENSE, ROLE_KEY, SPARSE, UPDATED_TS, BaseStore, Hit, Scope, point_row
from streams.settings import StoreSettings

BATCH = 512


def _scope_filter(scope: Scope) -> qe.Filter:
    must: list[Any] = [qe.FieldCondition("user_id", match=qe.MatchValue(scope.user_id))]
    if scope.ts_from is not None:
        must.append(qe.FieldCondition("event_ts_max", range=qe.RangeFloat(gte=scope.ts_from)))
    if scope.ts_to is not None:
        must.append(qe.FieldCondition("event_ts_min", range=qe.RangeFloat(lte=scope.ts_to)))
    if scope.kinds is not None:
        must.append(qe.FieldCondition("kind", match=qe.MatchAny(list(scope.kinds))))
    if scope.roles is not None:
        must.append(qe.FieldCondition(ROLE_KEY, match=qe.MatchAny(list(scope.roles))))
    if scope.ids is not None:
        must.append(qe.HasIdCondition(set(scope.ids)))
    if scope.updated_after is not None:  # newer, or written before updated_ts existed (checked in Python)
        must.append(
            qe.Filter(
                should=[
                    qe.FieldCondition(UPDATED_TS, range=qe.RangeFloat(gt=scope.updated_after)),
                    qe.IsEmptyCondition(UPDATED_TS),
                ]
            )
        )
    return qe.Filter(must=must)


def _user_filter(user_id: str) -> qe.Filter:
    return qe.Filter(must=[qe.FieldCondition("user_id", match=qe.MatchValue(user_id))])


class EdgeStore(BaseStore):
    def __init__(self, settings: StoreSettings, dim: int, collection: str) -> None:
        super().__init__(settings, dim)
        self.path = Path(settings.path) / collection
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        )
        self._lock = threading.RLock()
        if self.path.exists() and any(self.path.iterdir()):
            try:
                self._shard = qe.EdgeShard.load(str(self.path), config)
            except Exception as exc:  # the engine raises a bare RuntimeError/ValueError
                raise ValueError(f"cannot open edge shard at {self.path} with a {dim}-d dense vector: {exc}") from exc
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._shard = qe.EdgeShard.create(str(self.path), config)
        self._ensure_indexes()

    def _ensure_indexes(self) -> None:
        have = set(self._shard.info().payload_schema)
        wanted: dict[str, Any] = {
            "user_id": qe.KeywordIndexParams(is_tenant=True),
            "kind": qe.PayloadSchemaType.Keyword,
            ROLE_KEY: qe.PayloadSchemaType.Keyword,
            "event_ts_min": qe.PayloadSchemaType.Float,
            "event_ts_max": qe.PayloadSchemaType.Float,
            UPDATED_TS: qe.PayloadSchemaType.Float,
        }
        for field, schema in wanted.items():
            if field not in have:
                self._shard.update(qe.UpdateOperation.create_field_index(field, schema))

    # -- primitives -------------------------------------------------------------------
    def _write(
        self, ids: list[str], dense: np.ndarray, docs: list[sparse.Sparse], payloads: list[dict[str, Any]]
    ) -> None:
        points = []
        for pid, vec, doc, payload in zip(ids, dense.tolist(), docs, payloads, strict=True):
            vector: dict[str, Any] = {DENSE: vec}
            if doc:
                vector[SPARSE] = qe.SparseVector(doc.indices, doc.values)
            points.append(qe.Point(pid, vector, payload))
        with self._lock:
            for i in range(0, len(points), BATCH):
                self._shard.update(qe.UpdateOperation.upsert_points(points[i : i + BATCH]))
            # durable before the caller is told the memories exist: a killed owner keeps what it acknowledged
            self._shard.flush()

    def _query(
        self, scope: Scope, dense: np.ndarray | None, sp: sparse.Sparse | None, limit: int, with_payload: bool
    ) -> list[list[Hit]]:
        flt = _scope_filter(scope)
        requests = []
        if dense is not None:
            requests.append(
                qe.QueryRequest(
                    limit=limit,
                    query=qe.Query.Nearest(dense.tolist(), using=DENSE),
                    filter=flt,
                    with_payload=with_payload,
                )
            )
        if sp is not None:
            # IDF over the user's own memories: scores never depend on (or reveal) other users' data
            params = qe.SearchParams(idf=qe.IdfParams(corpus=_user_filter(scope.user_id)))
            requests.append(
                qe.QueryRequest(
                    limit=limit,
                    query=qe.Query.Nearest(qe.SparseVector(sp.indices, sp.values), using=SPARSE),
                    filter=flt,
                    with_payload=with_payload,
                    params=params,
                )
            )
        if len(requests) == 1:
            results = [self._shard.query(requests[0])]
        else:
            results = self._shard.query_batch(qe.QueryBatchRequest(requests))
        return [[Hit(str(p.id), float(p.score), p.payload) for p in res] for res in results]

    def _fused(self, scope: Scope, dense: np.ndarray, sp: sparse.Sparse, depth: int, limit: int) -> list[Hit]:
        flt = _scope_filter(scope)
        params = qe.SearchParams(idf=qe.IdfParams(corpus=_user_filter(scope.user_id)))
        prefetches = [
            qe.Prefetch(depth, query=qe.Query.Nearest(dense.tolist(), using=DENSE), filter=flt),
            qe.Prefetch(
                depth,
                query=qe.Query.Nearest(qe.SparseVector(sp.indices, sp.values), using=SPARSE),
                filter=flt,
                params=params,
            ),
        ]
        fusion: Any = qe.Fusion.Dbsf() if self.settings.fusion == "dbsf" else qe.Fusion.Rrf(k=self.settings.rrf_k)
        request = qe.QueryRequest(limit=limit, query=fusion, prefetches=prefetches, filter=flt, with_payload=True)
        return [Hit(str(p.id), float(p.score), p.payload) for p in self._shard.query(request)]

    def _fetch(self, scope: Scope, with_vector: bool) -> list[tuple[str, Mapping[str, Any], np.ndarray | None]]:
        flt = _scope_filter(scope)
        out: list[tuple[str, Mapping[str, Any], np.ndarray | None]] = []
        offset: Any = None
        while True:
            req = qe.ScrollRequest(
                offset=offset, limit=1024, filter=flt, with_payload=True, with_vector=[DENSE] if with_vector else False
            )
            points, offset = self._shard.scroll(req)
            out.extend(point_row(p, with_vector, DENSE) for p in points)
            if offset is None:
                return out

    def _delete(self, scope: Scope) -> None:
        with self._lock:
            self._shard.update(qe.UpdateOperation.delete_points_by_filter(_scope_filter(scope)))
            self._shard.flush()  # an erasure must survive a crash of the owner

    def _count(self, user_id: str | None) -> int:
        flt = _user_filter(user_id) if user_id is not None else None
        return int(self._shard.count(qe.CountRequest(exact=True, filter=flt)))

    def users(self) -> list[str]:
        total = self._count(None)
        if not total:
            return []
        hits = self._shard.facet(qe.FacetRequest("user_id", limit=total, exact=True))
        return sorted(str(h.value) for h in hits if h.count > 0)  # exact facets list deleted values with count 0

    def optimize(self) -> bool:
        """Merge segments and build indexes (blocking); worth calling after a bulk load."""
        with self._lock:
            return bool(self._shard.optimize())

    def close(self) -> None:
        with self._lock:
            try:
                if self._shard is not None:
                    self._shard.flush()
                    self._shard.close()
                    self._shard = None  # type: ignore[assignment]
            finally:
                self.release_owner()
