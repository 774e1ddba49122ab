"""Concurrent searches share one encoder pass.

One query costs ~15 ms of CPU in the encoder, and the encoder runs one call at a time, so eight concurrent searches
embedded one by one wait for each other (p95 ≈ 8 × 15 ms). :class:`BatchingEncoder` sits in front of the encoder:
``embed_one`` calls from many request threads queue up, and one thread embeds everything queued in a single
batched forward pass (a lone query still takes the encoder's single-query fast path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

from streams import metrics
from streams.encoder import Encoder

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Items put from any thread, served in batches by one thread of its own (``_serve``, in subclasses).

    ``window_s``: when an item arrives while the thread is idle, wait this long for others to join it; items that
    arrive while a batch is served form the next one. At most ``max_batch`` items per batch.
    """

    def __init__(self, what: str, thread_name: str, window_s: float, max_batch: int) -> None:
        self.what = what
        self.window_s = window_s
        self.max_batch = max_batch
        self._pending: list[T] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError(f"the {self.what} is closed")
            self._pending.append(item)
            self._cv.notify()

    def _take(self) -> list[T] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if not self._pending:
                return None
        if self.window_s > 0:
            time.sleep(self.window_s)  # let items arriving together share the batch
        with self._cv:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._serve(batch)

    def _serve(self, batch: list[T]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)


class BatchingEncoder(MicroBatcher[tuple[str, "Future[np.ndarray]"]]):
    """A drop-in for :class:`~streams.encoder.Encoder` whose ``embed_one`` is micro-batched across threads.

    ``window_s``: when a query arrives at an idle encoder, wait this long for others to join it. Every other
    attribute (``embed``, ``dim``, attention, token counts) is the wrapped encoder's own.
    """

    def __init__(self, encoder: Encoder, window_s: float = 0.002, max_batch: int = 64) -> None:
        self._encoder = encoder
        super().__init__("query encoder", "query-encoder", window_s, max_batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def embed_one(self, text: str) -> np.ndarray:
        fut: Future[np.ndarray] = Future()
        self.put((text, fut))
        return fut.result()

    def _serve(self, batch: list[tuple[str, Future[np.ndarray]]]) -> None:
        texts = [t for t, _ in batch]
        metrics.SEARCH_BATCH.observe(len(texts))
        try:
            vecs: Sequence[np.ndarray] = (
                [self._encoder.embed_one(texts[0])] if len(texts) == 1 else list(self._encoder.embed(texts))
            )
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), vec in zip(batch, vecs, strict=True):
            fut.set_result(np.asarray(vec, dtype=np.float32))
