"""Long-term memory store: contract tests on both embedded backends, plus edge ≡ local congruence."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from schemas.records import MemoryRecord, SourceTurn
from streams.ids import memory_id
from streams.ltm import MemoryStore, MissingUserError, open_store
from streams.ltm.sparse import document_vector, query_vector, term_index, tokenize
from streams.settings import StoreSettings

DIM = 8
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def rec(user: str, n: int, text: str, *, kind: str = "fact", day: int = 0, days: int = 0) -> MemoryRecord:
    turns = [f"{user}-turn-{n}"]
    stamps = [T0 + timedelta(days=day)] + ([T0 + timedelta(days=day + days)] if days else [])
    return MemoryRecord(
        memory_id=memory_id(user, turns, n, kind),
        user_id=user,
        session_ids=["s1"],
        text=text,
        kind=kind,  # type: ignore[arg-type]
        source_turn_ids=turns,
        event_timestamps=stamps,
        topic_id="topic-1",
        summary_id="summary-1",
        pipeline_version="test",
        created_at=T0 + timedelta(minutes=n),
        updated_at=T0 + timedelta(minutes=n),
    )


def unit(*pairs: tuple[int, float]) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    for i, x in pairs:
        v[i] = x
    return v / np.linalg.norm(v)


# A hand-made corpus: query vector e0 ranks X, Z, o1, o2, o3, Y (Y last);
# the words "trip reykjavik" match Y (both, one rare) and Z ("reykjavik" only).
CORPUS = [
    ("X", "Bought a new bicycle for commuting", unit((0, 1.0))),
    ("Z", "Booked a hotel in Reykjavik", unit((0, 1.0), (1, 0.8))),
    ("o1", "Works as a nurse at the city hospital", unit((0, 0.3), (2, 1.0))),
    ("o2", "Favourite food is sushi with green tea", unit((0, 0.2), (3, 1.0))),
    ("o3", "Plays the violin on weekends", unit((0, 0.1), (4, 1.0))),
    ("Y", "Trip to Reykjavik in March to see the northern lights", unit((0, -0.5), (5, 1.0))),
]


def corpus(user: str = "alice") -> tuple[list[MemoryRecord], np.ndarray, dict[str, str]]:
    records = [rec(user, i, text, day=i) for i, (_, text, _) in enumerate(CORPUS)]
    vecs = np.stack([v for _, _, v in CORPUS])
    names = {r.memory_id: name for r, (name, _, _) in zip(records, CORPUS, strict=True)}
    return records, vecs, names


def make(backend: str, tmp_path: Path, **kw: object) -> MemoryStore:
    return open_store(StoreSettings(backend=backend, path=tmp_path / backend, **kw), DIM)  # type: ignore[arg-type]


@pytest.fixture(params=["edge", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = make(request.param, tmp_path, rrf_k=1)
    yield s
    s.close()


# -- sparse encoding ----------------------------------------------------------------------
def test_tokenizer_and_bm25_weights() -> None:
    assert tokenize("The DOGS were running, in Reykjavik!") == ["dog", "run", "reykjavik"]  # Snowball stems
    assert term_index("dog") == term_index("dog") and 0 <= term_index("dog") < 2**31
    q = query_vector("dogs dog the")
    assert q.indices == [term_index("dog")] and q.values == [1.0]
    short, long = document_vector("dog"), document_vector("dog " + "cat " * 30)
    i = short.indices.index(term_index("dog"))
    assert short.values[i] > long.values[long.indices.index(term_index("dog"))]  # length normalisation
    assert not document_vector("the and of")


# -- contract -----------------------------------------------------------------------------
def test_round_trip_and_idempotent_upsert(store: MemoryStore) -> None:
    records, vecs, _ = corpus()
    store.upsert(records, vecs)
    store.upsert(records, vecs)
    assert store.count("alice") == len(records) == store.count()
    assert store.get_all("alice") == records  # validates back to equal records, ordered by created_at
    assert store.get_all("alice", limit=2) == records[:2]
    wanted = [records[3].memory_id, "00000000-0000-0000-0000-000000000000", records[1].memory_id]
    assert store.get("alice", wanted) == [records[3], records[1]]
    assert store.get("alice", ["not-a-uuid", records[2].memory_id.upper()]) == [records[2]]
    with pytest.raises(ValueError, match="uuid"):
        store.upsert([records[0].model_copy(update={"memory_id": "m-1"})], vecs[:1])
    got = store.get_vectors("alice", [records[0].memory_id])
    np.testing.assert_allclose(got[records[0].memory_id], vecs[0], atol=1e-6)
    updated = records[0].model_copy(update={"text": "Bought a red bicycle", "version": 2})
    store.upsert([updated], vecs[:1])
    assert store.count("alice") == len(records)
    assert store.get("alice", [updated.memory_id]) == [updated]


def test_user_isolation(store: MemoryStore) -> None:
    a, vecs, _ = corpus("alice")
    b, _, _ = corpus("bob")
    store.upsert(a[:3] + b, np.concatenate([vecs[:3], vecs]))  # one call, two users
    assert store.users() == ["alice", "bob"]
    assert store.count("alice") == 3 and store.count("bob") == 6 and store.count() == 9
    for mode in ("dense", "sparse", "hybrid"):
        hits = store.search("alice", "trip reykjavik bicycle", unit((0, 1.0)), 20, mode=mode)  # type: ignore[arg-type]
        assert hits and all(h.record.user_id == "alice" for h in hits)
    assert store.get("alice", [r.memory_id for r in b]) == []
    assert store.get_vectors("alice", [r.memory_id for r in b]) == {}
    store.delete("alice", [r.memory_id for r in b])  # not alice's: nothing happens
    assert store.count("bob") == 6


def test_missing_user_is_rejected(store: MemoryStore) -> None:
    records, vecs, _ = corpus()
    store.upsert(records, vecs)
    for bad in ("", None):
        with pytest.raises(MissingUserError, match="user_id"):
            store.search(bad, "reykjavik", vecs[0])  # type: ignore[arg-type]
        with pytest.raises(MissingUserError):
            store.get(bad, [records[0].memory_id])  # type: ignore[arg-type]
        with pytest.raises(MissingUserError):
            store.get_all(bad)  # type: ignore[arg-type]
        with pytest.raises(MissingUserError):
            store.get_vectors(bad, [records[0].memory_id])  # type: ignore[arg-type]
        with pytest.raises(MissingUserError):
            store.delete(bad, [records[0].memory_id])  # type: ignore[arg-type]
        with pytest.raises(MissingUserError):
            store.delete_user(bad)  # type: ignore[arg-type]
    nameless = MemoryRecord.model_construct(**{**records[0].model_dump(), "user_id": ""})
    with pytest.raises(MissingUserError):
        store.upsert([records[1], nameless], vecs[:2])
    assert store.count() == len(records)


def test_search_modes_top_hit(store: MemoryStore) -> None:
    records, vecs, names = corpus()
    store.upsert(records, vecs)
    q = unit((0, 1.0))
    dense = store.search("alice", "trip reykjavik", q, 3, mode="dense")
    assert [names[h.record.memory_id] for h in dense] == ["X", "Z", "o1"]
    assert dense[0].score == pytest.approx(1.0, abs=1e-5)
    sparse = store.search("alice", "trip reykjavik", q, 10, mode="sparse")
    assert [names[h.record.memory_id] for h in sparse] == ["Y", "Z"]  # the rare word dense ranks last
    hybrid = store.search("alice", "trip reykjavik", q, 3, mode="hybrid")
    assert names[hybrid[0].record.memory_id] == "Z"  # second in both branches beats first in one (k=1)
    assert [names[h.record.memory_id] for h in store.search("alice", "trip reykjavik", q, 3)] == [
        names[h.record.memory_id] for h in hybrid
    ]  # hybrid is the default
    assert store.search("alice", "the of and", None, 5, mode="sparse") == []
    with pytest.raises(ValueError, match="query_vector"):
        store.search("alice", "x", None, mode="dense")


def test_time_range_and_kinds(store: MemoryStore) -> None:
    records, vecs, _ = corpus()
    span = rec("alice", 10, "A week-long conference in Lisbon", kind="summary", day=-3, days=7)  # days -3..4
    store.upsert([*records, span], np.concatenate([vecs, unit((6, 1.0))[None]]))
    q = unit((0, 1.0))

    def ids(**kw: object) -> set[str]:
        return {h.record.memory_id for h in store.search("alice", "", q, 50, mode="dense", **kw)}  # type: ignore[arg-type]

    day = [r.memory_id for r in records]  # record i happens on day i
    assert ids(time_from=T0 + timedelta(days=2), time_to=T0 + timedelta(days=3, hours=1)) == {
        day[2],
        day[3],
        span.memory_id,
    }
    assert ids(time_from=T0 + timedelta(days=4, hours=1)) == {day[5]}
    assert ids(time_to=T0 - timedelta(days=1)) == {span.memory_id}
    assert ids(kinds=["summary"]) == {span.memory_id}
    assert ids(kinds=["fact"], time_to=T0 + timedelta(hours=1)) == {day[0]}


def test_get_all_updated_after_and_kinds(store: MemoryStore) -> None:
    from streams.ltm import sparse
    from streams.ltm.base import to_payload

    records, vecs, _ = corpus()  # updated_at = created_at = T0 + i minutes
    span = rec("alice", 10, "A week-long conference in Lisbon", kind="summary", day=-3, days=7)
    rewritten = records[1].model_copy(update={"version": 2, "updated_at": T0 + timedelta(hours=5)})
    bob = rec("bob", 7, "Bob's memory, updated late", day=1).model_copy(update={"updated_at": T0 + timedelta(hours=9)})
    store.upsert(
        [*records[:1], rewritten, *records[2:], span, bob], np.concatenate([vecs, unit((6, 1.0))[None], vecs[:1]])
    )
    # a point written before ``updated_ts`` was stored: no such payload field; it must still filter correctly
    legacy = rec("alice", 20, "Written by an older version", day=2)
    old_payload = {k: v for k, v in to_payload(legacy).items() if k != "updated_ts"}
    store._write([legacy.memory_id], vecs[:1], [sparse.document_vector(legacy.text)], [old_payload])  # type: ignore[attr-defined]
    everything = sorted(
        [*records[:1], rewritten, *records[2:], span, legacy], key=lambda r: (r.created_at, r.memory_id)
    )
    assert store.get_all("alice") == everything

    def got(**kw: object) -> list[str]:
        return [r.memory_id for r in store.get_all("alice", **kw)]  # type: ignore[arg-type]

    mid = [r.memory_id for r in records]
    assert got(updated_after=T0 + timedelta(minutes=3)) == [mid[1], mid[4], mid[5], span.memory_id, legacy.memory_id]
    assert got(updated_after=T0 + timedelta(minutes=3), kinds=["fact"]) == [mid[1], mid[4], mid[5], legacy.memory_id]
    assert got(updated_after=T0 + timedelta(minutes=10)) == [mid[1], legacy.memory_id]  # strictly after: span out
    assert got(updated_after=T0 + timedelta(minutes=20)) == [mid[1]]  # the legacy point is checked by updated_at
    assert got(updated_after=T0 + timedelta(hours=5)) == []
    assert got(kinds=["summary"]) == [span.memory_id]
    assert got(kinds=[]) == []
    assert got(updated_after=T0 + timedelta(minutes=3), limit=2) == [mid[1], mid[4]]  # order kept, then cut
    assert store.get_all("bob", updated_after=T0 + timedelta(hours=5)) == [bob]


def test_edge_indexes_updated_ts(tmp_path: Path) -> None:
    s = make("edge", tmp_path)
    try:
        assert "updated_ts" in s._shard.info().payload_schema  # type: ignore[attr-defined]
    finally:
        s.close()


def test_delete_and_delete_user(store: MemoryStore) -> None:
    a, vecs, _ = corpus("alice")
    b, _, _ = corpus("bob")
    store.upsert(a + b, np.concatenate([vecs, vecs]))
    store.delete("alice", [a[0].memory_id, a[1].memory_id])
    assert store.count("alice") == 4
    assert store.get("alice", [a[0].memory_id]) == []
    assert store.delete_user("bob") == 6
    assert store.count("bob") == 0 and store.users() == ["alice"]
    assert store.delete_user("bob") == 0
    assert store.count() == 4


def test_edge_reopens_from_disk(tmp_path: Path) -> None:
    records, vecs, _ = corpus()
    s = make("edge", tmp_path)
    s.upsert(records, vecs)
    s.close()
    s = make("edge", tmp_path)
    assert s.get_all("alice") == records
    assert s.search("alice", "reykjavik trip", vecs[5], 1)[0].record == records[5]
    s.close()
    with pytest.raises(ValueError, match="edge shard"):
        open_store(StoreSettings(path=tmp_path / "edge"), DIM + 1)


# -- congruence: edge and qdrant-client local mode agree -----------------------------------
VOCAB = [f"w{i}" for i in range(60)] + ["reykjavik", "sushi", "violin", "hospital", "bicycle", "lisbon"]


def random_corpus(seed: int = 7) -> tuple[list[MemoryRecord], np.ndarray]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    records = []
    for user in ("u1", "u2", "u3"):
        for n in range(40):
            words = rng.sample(VOCAB, rng.randint(3, 9))
            kind = "summary" if n % 5 == 0 else "fact"
            records.append(rec(user, n, " ".join(words), kind=kind, day=rng.randint(0, 30), days=rng.randint(0, 3)))
    vecs = nrng.normal(size=(len(records), DIM)).astype(np.float32)
    return records, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


CONGRUENCE_QUERIES = [
    ("u1", "reykjavik w3 w17", {}),
    ("u2", "sushi violin w40", {}),
    ("u3", "w5 w6 w7 w8", {"kinds": ["fact"]}),
    ("u1", "lisbon hospital w22", {"time_from": T0 + timedelta(days=5), "time_to": T0 + timedelta(days=20)}),
]


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory: pytest.TempPathFactory):
    records, vecs = random_corpus()
    root = tmp_path_factory.mktemp("congruence")
    stores = {b: open_store(StoreSettings(backend=b, path=root / b, prefetch=20), DIM) for b in ("edge", "local")}  # type: ignore[arg-type]
    for s in stores.values():
        s.upsert(records, vecs)
        s.delete("u2", [r.memory_id for r in records if r.user_id == "u2"][:5])  # deletions must not skew IDF
    yield stores
    for s in stores.values():
        s.close()


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
@pytest.mark.parametrize("qi", range(len(CONGRUENCE_QUERIES)))
def test_congruence_edge_local(both_backends: dict[str, MemoryStore], mode: str, qi: int) -> None:
    user, text, kw = CONGRUENCE_QUERIES[qi]
    qvec = np.random.default_rng(qi).normal(size=DIM).astype(np.float32)
    qvec /= np.linalg.norm(qvec)
    results = {
        b: s.search(user, text, qvec, 8, mode=mode, **kw)  # type: ignore[arg-type]
        for b, s in both_backends.items()
    }
    edge, local = results["edge"], results["local"]
    assert edge, "query should return something"
    assert [h.record.memory_id for h in edge] == [h.record.memory_id for h in local]
    assert [h.score for h in edge] == pytest.approx([h.score for h in local], rel=1e-4, abs=1e-6)
    assert [h.record for h in edge] == [h.record for h in local]


def test_congruence_reads(both_backends: dict[str, MemoryStore]) -> None:
    edge, local = both_backends["edge"], both_backends["local"]
    assert edge.users() == local.users() == ["u1", "u2", "u3"]
    assert edge.count() == local.count() == 115
    assert edge.get_all("u2") == local.get_all("u2")


def test_get_all_filters_congruent(both_backends: dict[str, MemoryStore]) -> None:
    edge, local = both_backends["edge"], both_backends["local"]
    for user in ("u1", "u2", "u3"):
        for minutes in (None, 0, 17, 39, 40):
            after = None if minutes is None else T0 + timedelta(minutes=minutes)
            for kinds in (None, ["fact"], ["summary"], ["fact", "summary"]):
                a = edge.get_all(user, updated_after=after, kinds=kinds)
                assert a == local.get_all(user, updated_after=after, kinds=kinds)
                full = [r for r in edge.get_all(user) if (after is None or r.updated_at > after)]
                assert a == [r for r in full if kinds is None or r.kind in kinds]


# -- server backend (needs a running Qdrant) ----------------------------------------------
@pytest.mark.skipif(
    not os.environ.get("LIGHTMEM_TEST_QDRANT_URL"), reason="no Qdrant server: set LIGHTMEM_TEST_QDRANT_URL to run"
)
def test_server_backend_matches_edge(tmp_path: Path) -> None:
    import uuid

    records, vecs = random_corpus()
    name = f"lightmem_test_{uuid.uuid4().hex[:8]}"
    server = open_store(StoreSettings(url=os.environ["LIGHTMEM_TEST_QDRANT_URL"]), DIM, collection=name)
    edge = open_store(StoreSettings(path=tmp_path), DIM, collection=name)
    try:
        for s in (server, edge):
            s.upsert(records, vecs)
        for user, text, kw in CONGRUENCE_QUERIES:
            for mode in ("dense", "sparse", "hybrid"):
                a = edge.search(user, text, vecs[0], 8, mode=mode, **kw)  # type: ignore[arg-type]
                b = server.search(user, text, vecs[0], 8, mode=mode, **kw)  # type: ignore[arg-type]
                assert [h.record.memory_id for h in a] == [h.record.memory_id for h in b]
        assert server.delete_user("u1") == 40
    finally:
        from qdrant_client import QdrantClient

        QdrantClient(url=os.environ["LIGHTMEM_TEST_QDRANT_URL"]).delete_collection(name)
        server.close()
        edge.close()


# -- real encoder -------------------------------------------------------------------------
@pytest.mark.slow
def test_real_encoder_hybrid(tmp_path: Path) -> None:
    from streams.encoder import load_encoder
    from streams.settings import EmbeddingSettings

    enc = load_encoder(EmbeddingSettings())
    records = [rec("alice", i, text) for i, (_, text, _) in enumerate(CORPUS)]
    s = open_store(StoreSettings(path=tmp_path), enc.dim)
    s.upsert(records, enc.embed([r.text for r in records]))
    query = "Where did Alice travel to see the northern lights?"
    for mode in ("dense", "hybrid"):
        top = s.search("alice", query, enc.embed_one(query), 3, mode=mode)  # type: ignore[arg-type]
        assert top[0].record.text.startswith("Trip to Reykjavik")
    s.close()


def test_search_by_role_of_the_source_turns(store: MemoryStore) -> None:
    """``roles`` keeps the memories made from a turn of those roles (``source_turns[].role``); a memory of no
    kept source turns (written before they were kept) matches none."""
    records, vecs, _ = corpus()
    roles = ["user", "assistant", None, "user", "assistant", "Caroline"]
    told = []
    for r, role in zip(records, roles, strict=False):
        if role is None:
            told.append(r)
            continue
        source = SourceTurn(turn_id=r.source_turn_ids[0], session_id="s1", seq=0, role=role, timestamp=T0, text=r.text)
        told.append(r.model_copy(update={"source_turns": [source]}))
    store.upsert(told, vecs[: len(told)])
    q = vecs[0]
    every = store.search("alice", "", q, 10, mode="dense")
    mine = store.search("alice", "", q, 10, mode="dense", roles=["user"])
    theirs = store.search("alice", "", q, 10, mode="dense", roles=["assistant", "Caroline"])
    want_mine = [h.record.memory_id for h in every if h.record.source_turns and h.record.source_turns[0].role == "user"]
    assert [h.record.memory_id for h in mine] == want_mine and len(want_mine) == 2
    assert {h.record.source_turns[0].role for h in theirs} == {"assistant", "Caroline"} and len(theirs) == 3
    assert store.search("alice", "", q, 10, mode="dense", roles=["tool"]) == []
