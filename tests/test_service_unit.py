"""Service parts without a server: keys and tenants, rate limits, cursors, the store's owner lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import MemoryRecord
from streams.ltm.owner import StoreBusyError, StoreOwner
from streams.service import convert
from streams.service.auth import NO_AUTH, KeyStore, Principal, valid_user
from streams.service.ratelimit import RateLimiter
from streams.service.run import is_loopback


def test_keys_file_holds_hashes_only_and_authenticates(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    key, row = store.create("acme", admin=True)
    text = (tmp_path / "keys.json").read_text()
    secret = key.rsplit("_", 1)[1]
    assert secret not in text and row.key_id in text
    assert oct(os.stat(tmp_path / "keys.json").st_mode & 0o777) == "0o600"
    who = store.authenticate(key)
    assert who == Principal(tenant="acme", admin=True, key_id=row.key_id)
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert store.authenticate(wrong) is None
    assert store.authenticate("lm_nope") is None
    assert store.authenticate("") is None


def test_revoked_key_stops_working_on_a_live_store(tmp_path):
    live = KeyStore(tmp_path / "keys.json")
    key, row = KeyStore(tmp_path / "keys.json").create("acme")
    assert live.authenticate(key) is not None
    KeyStore(tmp_path / "keys.json").revoke(row.key_id)  # another process (the CLI) revokes it
    assert live.authenticate(key) is None
    with pytest.raises(KeyError):
        live.revoke("nosuchkey000")


@pytest.mark.parametrize("tenant", ["", "a:b", "x" * 65, "-lead", "sp ace"])
def test_tenant_names_without_separator(tmp_path, tenant):
    with pytest.raises(ValueError):
        KeyStore(tmp_path / "k.json").create(tenant)


def test_tenant_scoping_round_trips_and_isolates():
    a = Principal("acme", False, "k1")
    b = Principal("beta", False, "k2")
    assert a.internal("alex") == "acme:alex" != b.internal("alex")
    assert a.external("acme:alex") == "alex"
    assert b.external("acme:alex") is None
    assert NO_AUTH.internal("alex") == "alex"
    assert NO_AUTH.external("acme:alex") is None  # the unprefixed namespace never sees a tenant's users
    assert a.external("alex") is None


@pytest.mark.parametrize(
    ("name", "ok"),
    [("alex", True), ("a.b@c-d_e", True), ("a:b", False), ("", False), ("ü", False), ("x" * 129, False)],
)
def test_user_names(name, ok):
    assert valid_user(name) is ok


def test_rate_limit_says_when_to_retry():
    limiter = RateLimiter("2/minute")
    assert limiter.hit("k") is None
    assert limiter.hit("k") is None
    retry = limiter.hit("k")
    assert retry is not None and 1 <= retry <= 60
    assert limiter.hit("other") is None  # per key


def _record(i: int, at: datetime) -> MemoryRecord:
    mid = f"00000000-0000-0000-0000-{i:012d}"
    return MemoryRecord(
        memory_id=mid,
        user_id="u",
        session_ids=["s"],
        text=f"fact {i}",
        kind="fact",
        source_turn_ids=["t"],
        event_timestamps=[at],
        topic_id="t",
        summary_id="s",
        pipeline_version="v",
        created_at=at,
        updated_at=at,
    )


def test_pages_cover_every_record_once():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    records = sorted(
        (_record(i, t0 + timedelta(seconds=i // 3)) for i in range(10)), key=lambda r: (r.created_at, r.memory_id)
    )
    seen, cursor = [], None
    while True:
        page, cursor = convert.page(records, convert.decode_cursor(cursor) if cursor else None, 4)
        seen.extend(r.memory_id for r in page)
        if cursor is None:
            break
    assert seen == [r.memory_id for r in records]
    for bad in ("x", "e30", convert.encode_cursor(records[0])[:-3] + "!!"):
        with pytest.raises(ValueError):
            convert.decode_cursor(bad)


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_second_process_gets_one_line_naming_the_owner(tmp_path: Path):
    owner = StoreOwner(tmp_path, "mem")
    owner.set_api_url("http://127.0.0.1:8420")
    code = (
        "import sys\n"
        "from streams.ltm.owner import StoreOwner, StoreBusyError\n"
        "try:\n"
        f"    StoreOwner({str(tmp_path)!r}, 'mem')\n"
        "except StoreBusyError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 3, out.stderr
    line = out.stdout.strip()
    assert "\n" not in line
    assert str(os.getpid()) in line and "LIGHTMEM_API__URL=http://127.0.0.1:8420" in line
    owner.release()
    again = StoreOwner(tmp_path, "mem")  # released: the next owner gets it
    assert json.loads((tmp_path / ".mem.owner.json").read_text())["pid"] == os.getpid()
    again.release()
    with pytest.raises(StoreBusyError):
        held = StoreOwner(tmp_path, "mem")
        try:
            StoreOwner(tmp_path, "mem")
        finally:
            held.release()


def test_keys_cli_prints_the_key_alone_on_its_last_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LIGHTMEM_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True, env=env, timeout=120
        )

    created = cli("keys", "create", "--tenant", "acme", "--admin")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    who = KeyStore(tmp_path / "api_keys.json").authenticate(key)
    assert who is not None and who.tenant == "acme" and who.admin
    listed = cli("keys", "list")
    assert who.key_id in listed.stdout and key not in listed.stdout
    assert cli("keys", "revoke", who.key_id).returncode == 0
    assert KeyStore(tmp_path / "api_keys.json").authenticate(key) is None
    bad = cli("keys", "create", "--tenant", "a:b")
    assert bad.returncode == 2 and "tenant" in bad.stderr


@pytest.mark.slow
def test_concurrent_queries_share_one_encoder_pass(encoder):
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from prometheus_client import REGISTRY

    from streams.service.batcher import BatchingEncoder

    queries = [f"what did Alex do in city number {i}?" for i in range(16)]
    alone = [encoder.embed_one(q) for q in queries]
    batched = BatchingEncoder(encoder, window_s=0.02)
    passes0 = REGISTRY.get_sample_value("lightmem_search_encode_batch_count") or 0.0
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(batched.embed_one, queries))
    finally:
        batched.close()
    passes = (REGISTRY.get_sample_value("lightmem_search_encode_batch_count") or 0.0) - passes0
    assert passes < len(queries)  # fewer encoder passes than queries
    for a, b in zip(alone, together, strict=True):
        assert float(np.dot(a, b)) > 0.9999  # the same vector (padding in a batch moves only the last digits)
    assert batched.dim == encoder.dim  # everything else is the wrapped encoder's
