"""API keys, tenants and the scoping of user ids.

A key is ``lm_<key id>_<secret>``: the id names the row in the keys file, the 256-bit secret is checked against
its SHA-256 hash (a random secret of that size needs no slow hash: there is nothing to brute-force), compared in
constant time. The file holds hashes only; ``lightmem keys create`` prints a key once.

Every key belongs to one tenant. The tenant becomes part of every internal user id, ``"<tenant>:<user>"`` — and so
of every turn id, memory id, store filter and topic key derived from it — so two tenants may both have a user
"alex" and never see each other. ``:`` is allowed in neither name, so no tenant's ids can collide with another's
or with the unprefixed ids of the embedded namespace (what ``Memory`` in-process and ``--no-auth`` serve).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
_TENANT = re.compile(TENANT_PATTERN)
_USER = re.compile(USER_PATTERN)
_KEY = re.compile(r"^lm_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
SEP = ":"


class KeyRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str
    tenant: str = Field(pattern=TENANT_PATTERN)
    admin: bool = False
    sha256: str
    created_at: AwareDatetime
    revoked_at: AwareDatetime | None = None
    note: str = ""


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    keys: list[KeyRow] = Field(default_factory=list)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (None = the unprefixed embedded namespace of ``--no-auth``) and its rights."""

    tenant: str | None
    admin: bool
    key_id: str

    def internal(self, user_id: str) -> str:
        """The store's user id for this tenant's ``user_id`` (validated by the caller)."""
        return user_id if self.tenant is None else f"{self.tenant}{SEP}{user_id}"

    def external(self, internal_id: str) -> str | None:
        """This tenant's name for an internal user id, or None when the id is not this tenant's."""
        if self.tenant is None:
            return None if SEP in internal_id else internal_id
        prefix = f"{self.tenant}{SEP}"
        return internal_id[len(prefix) :] if internal_id.startswith(prefix) else None


NO_AUTH = Principal(tenant=None, admin=True, key_id="no-auth")


def valid_tenant(name: str) -> bool:
    return bool(_TENANT.match(name))


def valid_user(name: str) -> bool:
    return bool(_USER.match(name))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The keys file (JSON, mode 0600), re-read when it changes so ``keys create``/``revoke`` act on a live server."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._rows: dict[str, KeyRow] = {}

    def _load(self) -> KeysFile:
        if not self.path.exists():
            return KeysFile()
        return KeysFile.model_validate_json(self.path.read_text())

    def _save(self, data: KeysFile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data.model_dump_json(indent=2))
        os.replace(tmp, self.path)

    def create(self, tenant: str, *, admin: bool = False, note: str = "") -> tuple[str, KeyRow]:
        """A new key for ``tenant``: returns (the key, shown once; its stored row)."""
        if not valid_tenant(tenant):
            raise ValueError(f"tenant must match {TENANT_PATTERN} (no ':'), got {tenant!r}")
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        secret = secrets.token_urlsafe(32)
        row = KeyRow(
            key_id=key_id, tenant=tenant, admin=admin, sha256=_digest(secret), created_at=datetime.now(UTC), note=note
        )
        data = self._load()
        data.keys.append(row)
        self._save(data)
        return f"lm_{key_id}_{secret}", row

    def rows(self) -> list[KeyRow]:
        return self._load().keys

    def revoke(self, key_id: str) -> KeyRow:
        data = self._load()
        for i, row in enumerate(data.keys):
            if row.key_id == key_id:
                if row.revoked_at is None:
                    data.keys[i] = row.model_copy(update={"revoked_at": datetime.now(UTC)})
                    self._save(data)
                return data.keys[i]
        raise KeyError(f"no key {key_id!r} in {self.path}")

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._rows, self._mtime = {}, None
            return
        if mtime != self._mtime:
            self._rows = {r.key_id: r for r in self._load().keys}
            self._mtime = mtime

    def authenticate(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None otherwise (unknown, malformed, revoked or wrong secret)."""
        m = _KEY.match(key)
        if m is None:
            return None
        self._refresh()
        row = self._rows.get(m.group(1))
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.sha256, _digest(m.group(2))):
            return None
        return Principal(tenant=row.tenant, admin=row.admin, key_id=row.key_id)


def keys_path(keys_file: Path | None, data_dir: Path) -> Path:
    return Path(keys_file) if keys_file is not None else Path(data_dir) / "api_keys.json"
