"""Crypto-shredding of the raw-turn log: per-user content keys in a compacted topic.

The raw-turn topic is the append-only log of record, kept forever. With ``settings.kafka.seal_turns`` (the
default) a producer encrypts each turn's content with its user's key (Fernet: AES-128-CBC + HMAC-SHA256, from
``cryptography``) before sending it: the record carries ``sealed`` (the token) and ``key_id``, and an empty
``content``. Keys live on the ``keys`` topic (compacted, key ``<user>/<key id>``, value ``UserKey``). Erasing a
user tombstones their keys, so every turn they ever sent becomes unreadable wherever the log is read: by a
worker, by a replay, by anyone holding a copy of the topic — without rewriting the log. Keys are created on a
user's first turn (a random id, so two producers racing for a new user each create a key and both stay valid).

The keys topic holds secrets: restrict who may read it (Kafka ACLs) in a real deployment.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from cryptography.fernet import Fernet, InvalidToken

from schemas.records import RawTurn, UserKey
from streams.settings import KafkaSettings

from .erasure import purge_user
from .topics import dumps, keyed_send, latest_by_key

log = logging.getLogger(__name__)


class KeyShredded(LookupError):
    """The turn's key is gone: its user was erased."""


class KeyRing:
    """The users' content keys, read from the keys topic (refreshed when an unknown key id shows up)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._keys: dict[tuple[str, str], Fernet] = {}
        self._current: dict[str, str] = {}  # user → the key id new turns use
        self._gone: set[tuple[str, str]] = set()  # asked for and not on the topic: shredded
        self._loaded = False
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        rows = await latest_by_key(self.kafka, self.kafka.topics.keys)
        keys: dict[tuple[str, str], Fernet] = {}
        current: dict[str, tuple[datetime, str]] = {}
        for rec in rows.values():
            k = UserKey.model_validate_json(rec.value)
            keys[(k.user_id, k.key_id)] = Fernet(k.key.encode())
            if k.user_id not in current or current[k.user_id][0] < k.created_at:
                current[k.user_id] = (k.created_at, k.key_id)
        self._keys = keys
        self._current = {u: kid for u, (_, kid) in current.items()}
        self._loaded = True

    async def cipher(self, user_id: str, key_id: str) -> Fernet:
        """The key that sealed a turn; ``KeyShredded`` when it is not on the topic (the user was erased)."""
        ident = (user_id, key_id)
        if ident in self._keys:
            return self._keys[ident]
        if ident in self._gone:
            raise KeyShredded(f"the key {key_id} of user {user_id!r} was erased")
        async with self._lock:
            await self.refresh()
        if ident not in self._keys:
            self._gone.add(ident)  # key ids are random: a shredded one never comes back
            raise KeyShredded(f"the key {key_id} of user {user_id!r} was erased")
        return self._keys[ident]

    async def key_for(self, user_id: str, producer: AIOKafkaProducer) -> tuple[str, Fernet]:
        """The key new turns of the user are sealed with, created (and acknowledged on the topic) when missing."""
        if not self._loaded:
            async with self._lock:
                if not self._loaded:
                    await self.refresh()
        kid = self._current.get(user_id)
        if kid is not None:
            return kid, self._keys[(user_id, kid)]
        key = UserKey(
            user_id=user_id, key_id=uuid.uuid4().hex, key=Fernet.generate_key().decode(), created_at=datetime.now(UTC)
        )
        send = keyed_send(user_id, key.key_id, self.kafka.partitions)
        await (await producer.send(self.kafka.topics.keys, value=dumps(key), **send))
        fernet = Fernet(key.key.encode())
        self._keys[(user_id, key.key_id)] = fernet
        self._current[user_id] = key.key_id
        return key.key_id, fernet

    def forget(self, user_id: str) -> None:
        for ident in [i for i in self._keys if i[0] == user_id]:
            del self._keys[ident]
            self._gone.add(ident)
        self._current.pop(user_id, None)


def seal(turn: RawTurn, key_id: str, fernet: Fernet) -> RawTurn:
    """The turn as it goes on the raw-turn topic: content encrypted, ids and times in the clear."""
    token = fernet.encrypt(turn.content.encode("utf-8")).decode("ascii")
    return turn.model_copy(update={"content": "", "sealed": token, "key_id": key_id})


async def unseal(turn: RawTurn, keys: KeyRing) -> RawTurn:
    """The readable turn (validated again, so the content limits hold for the plaintext).

    Raises ``KeyShredded`` when its key was erased and ``ValueError`` when the token does not decrypt.
    """
    if turn.sealed is None or turn.key_id is None:
        return turn
    fernet = await keys.cipher(turn.user_id, turn.key_id)
    try:
        text = fernet.decrypt(turn.sealed.encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError) as exc:
        raise ValueError(f"the sealed content of turn {turn.turn_id} does not decrypt with key {turn.key_id}") from exc
    data = turn.model_dump()
    data.update(content=text, sealed=None, key_id=None)
    return RawTurn.model_validate(data)


async def shred(kafka: KafkaSettings, user_id: str) -> int:
    """Tombstone every key of the user: their sealed turns can no longer be read."""
    n = await purge_user(kafka, user_id, [kafka.topics.keys])
    log.info("shredded %d key(s) of user %s", n, user_id)
    return n
