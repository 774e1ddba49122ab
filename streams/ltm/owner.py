"""One owner process per on-disk store: an OS file lock beside the collection, and who holds it.

Two processes on one local Qdrant folder corrupt it or fail deep inside the engine (qdrant-client #1018). So the
process that opens an on-disk store takes ``<store path>/.<collection>.lock`` (``filelock``: ``flock`` on POSIX,
released by the OS if the process dies) and writes ``.<collection>.owner.json`` with its pid and, once it serves
the API, the URL. A second process gets :class:`StoreBusyError`, whose message is one line naming the owner's pid
and the ``LIGHTMEM_API__URL`` to use instead; the CLI prints exactly that line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock, Timeout


class StoreBusyError(RuntimeError):
    """The on-disk store is owned by another live process."""


def _files(path: Path, collection: str) -> tuple[Path, Path]:
    return path / f".{collection}.lock", path / f".{collection}.owner.json"


def read_owner(path: Path, collection: str) -> dict[str, object]:
    _, info = _files(Path(path), collection)
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class StoreOwner:
    """The held lock of one store directory and collection; :meth:`release` on close."""

    def __init__(self, path: Path, collection: str) -> None:
        self.path = Path(path)
        self.collection = collection
        self.path.mkdir(parents=True, exist_ok=True)
        lock_file, self._info = _files(self.path, collection)
        self._lock = FileLock(lock_file, timeout=0, is_singleton=False)
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreBusyError(busy_message(self.path, collection)) from None
        self._write(None)

    def _write(self, api_url: str | None) -> None:
        self._info.write_text(json.dumps({"pid": os.getpid(), "api_url": api_url}))

    def set_api_url(self, api_url: str | None) -> None:
        """Record where this owner serves the API, so a second process is told where to go."""
        if self._lock.is_locked:
            self._write(api_url)

    def release(self) -> None:
        if self._lock.is_locked:
            self._info.unlink(missing_ok=True)
            self._lock.release()


def busy_message(path: Path, collection: str) -> str:
    owner = read_owner(path, collection)
    pid = owner.get("pid", "unknown")
    url = owner.get("api_url")
    where = f"{Path(path) / collection}"
    if url:
        return (
            f"the store at {where} is owned by process {pid}, which serves it at {url}: "
            f"set LIGHTMEM_API__URL={url} to go through it"
        )
    return (
        f"the store at {where} is owned by process {pid} (no API served; LIGHTMEM_API__URL unset): "
        "stop it, or run `lightmem serve` as the one owner and set LIGHTMEM_API__URL to its URL"
    )
