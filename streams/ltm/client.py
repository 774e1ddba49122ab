"""Backends ``local`` (qdrant-client local mode, on disk) and ``server`` (a Qdrant server via qdrant-client)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from streams.ltm import sparse
from streams.ltm.base import DENSE, ROLE_KEY, SPARSE, UPDATED_TS, BaseStore, Hit, Scope, point_row
from streams.settings import StoreSettings

BATCH = 256


def _user_cond(user_id: str) -> models.FieldCondition:
    return models.FieldCondition(key="user_id", match=models.MatchValue(value=user_id))


def _scope_filter(scope: Scope) -> models.Filter:
    must: list[Any] = [_user_cond(scope.user_id)]
    if scope.ts_from is not None:
        must.append(models.FieldCondition(key="event_ts_max", range=models.Range(gte=scope.ts_from)))
    if scope.ts_to is not None:
        must.append(models.FieldCondition(key="event_ts_min", range=models.Range(lte=scope.ts_to)))
    if scope.kinds is not None:
        must.append(models.FieldCondition(key="kind", match=models.MatchAny(any=list(scope.kinds))))
    if scope.roles is not None:
        must.append(models.FieldCondition(key=ROLE_KEY, match=models.MatchAny(any=list(scope.roles))))
    if scope.ids is not None:
        must.append(models.HasIdCondition(has_id=list(scope.ids)))
    if scope.updated_after is not None:  # newer, or written before updated_ts existed (checked in Python)
        must.append(
            models.Filter(
                should=[
                    models.FieldCondition(key=UPDATED_TS, range=models.Range(gt=scope.updated_after)),
                    models.IsEmptyCondition(is_empty=models.PayloadField(key=UPDATED_TS)),
                ]
            )
        )
    return models.Filter(must=must)


class ClientStore(BaseStore):
    """qdrant-client facade: ``QdrantClient(path=...)`` for local mode, ``QdrantClient(url=...)`` for a server."""

    def __init__(self, settings: StoreSettings, dim: int, collection: str, *, server: bool) -> None:
        super().__init__(settings, dim)
        self.collection = collection
        self.server = server
        if server:
            key = settings.api_key.get_secret_value() if settings.api_key is not None else None
            self._client = QdrantClient(url=settings.url, api_key=key)
        else:
            path = Path(settings.path) / "local"
            path.mkdir(parents=True, exist_ok=True)
            self._client = QdrantClient(path=str(path))
        self._ensure_collection()

    def _ensure_collection(self) -> None:
        c = self._client
        if c.collection_exists(self.collection):
            info = c.get_collection(self.collection)
            params = info.config.params.vectors
            size = params[DENSE].size if isinstance(params, dict) and DENSE in params else None
            if size != self.dim:
                raise ValueError(f"collection {self.collection!r} has dense size {size}, expected {self.dim}")
            have = set(info.payload_schema or {})
        else:
            c.create_collection(
                self.collection,
                vectors_config={DENSE: models.VectorParams(size=self.dim, distance=models.Distance.COSINE)},
                sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
            )
            have = set()
        if self.server:  # local mode has no payload indexes (it warns and ignores them)
            indexes: dict[str, Any] = {
                "user_id": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
                "kind": models.PayloadSchemaType.KEYWORD,
                ROLE_KEY: models.PayloadSchemaType.KEYWORD,
                "event_ts_min": models.PayloadSchemaType.FLOAT,
                "event_ts_max": models.PayloadSchemaType.FLOAT,
                UPDATED_TS: models.PayloadSchemaType.FLOAT,
            }
            for field, schema in indexes.items():  # an older collection gets the indexes it lacks
                if field not in have:
                    c.create_payload_index(self.collection, field, field_schema=schema, wait=True)

    # -- primitives -------------------------------------------------------------------
    def _write(
        self, ids: list[str], dense: np.ndarray, docs: list[sparse.Sparse], payloads: list[dict[str, Any]]
    ) -> None:
        points = []
        for pid, vec, doc, payload in zip(ids, dense.tolist(), docs, payloads, strict=True):
            vector: dict[str, Any] = {DENSE: vec}
            if doc:
                vector[SPARSE] = models.SparseVector(indices=doc.indices, values=doc.values)
            points.append(models.PointStruct(id=pid, vector=vector, payload=payload))
        for i in range(0, len(points), BATCH):
            self._client.upsert(self.collection, points=points[i : i + BATCH], wait=True)

    def _query(
        self, scope: Scope, dense: np.ndarray | None, sp: sparse.Sparse | None, limit: int, with_payload: bool
    ) -> list[list[Hit]]:
        flt = _scope_filter(scope)
        requests = []
        if dense is not None:
            requests.append(
                models.QueryRequest(
                    query=dense.tolist(), using=DENSE, filter=flt, limit=limit, with_payload=with_payload
                )
            )
        if sp is not None:
            idf = models.IdfCorpusParams(corpus=models.Filter(must=[_user_cond(scope.user_id)]))
            requests.append(
                models.QueryRequest(
                    query=models.SparseVector(indices=sp.indices, values=sp.values),
                    using=SPARSE,
                    filter=flt,
                    limit=limit,
                    with_payload=with_payload,
                    params=models.SearchParams(idf=idf),
                )
            )
        results = self._client.query_batch_points(self.collection, requests=requests)
        return [[Hit(str(p.id), float(p.score), p.payload) for p in res.points] for res in results]

    def _fused(self, scope: Scope, dense: np.ndarray, sp: sparse.Sparse, depth: int, limit: int) -> list[Hit]:
        flt = _scope_filter(scope)
        idf = models.IdfCorpusParams(corpus=models.Filter(must=[_user_cond(scope.user_id)]))
        prefetch = [
            models.Prefetch(query=dense.tolist(), using=DENSE, filter=flt, limit=depth),
            models.Prefetch(
                query=models.SparseVector(indices=sp.indices, values=sp.values),
                using=SPARSE,
                filter=flt,
                limit=depth,
                params=models.SearchParams(idf=idf),
            ),
        ]
        query: Any = (
            models.FusionQuery(fusion=models.Fusion.DBSF)
            if self.settings.fusion == "dbsf"
            else models.RrfQuery(rrf=models.Rrf(k=self.settings.rrf_k))
        )
        res = self._client.query_points(
            self.collection, prefetch=prefetch, query=query, query_filter=flt, limit=limit, with_payload=True
        )
        return [Hit(str(p.id), float(p.score), p.payload) for p in res.points]

    def _fetch(self, scope: Scope, with_vector: bool) -> list[tuple[str, Mapping[str, Any], np.ndarray | None]]:
        flt = _scope_filter(scope)
        out: list[tuple[str, Mapping[str, Any], np.ndarray | None]] = []
        offset: Any = None
        while True:
            points, offset = self._client.scroll(
                self.collection,
                scroll_filter=flt,
                limit=1024,
                offset=offset,
                with_payload=True,
                with_vectors=[DENSE] if with_vector else False,
            )
            out.extend(point_row(p, with_vector, DENSE) for p in points)
            if offset is None:
                return out

    def _delete(self, scope: Scope) -> None:
        self._client.delete(
            self.collection, points_selector=models.FilterSelector(filter=_scope_filter(scope)), wait=True
        )

    def _count(self, user_id: str | None) -> int:
        flt = models.Filter(must=[_user_cond(user_id)]) if user_id is not None else None
        return int(self._client.count(self.collection, count_filter=flt, exact=True).count)

    def users(self) -> list[str]:
        total = self._count(None)
        if not total:
            return []
        res = self._client.facet(self.collection, key="user_id", limit=total, exact=True)
        return sorted(str(h.value) for h in res.hits if h.count > 0)

    def close(self) -> None:
        try:
            self._client.close()
        finally:
            self.release_owner()
