"""The shared encoder under concurrent callers: the service embeds queries on one thread while ingest counts
tokens and embeds batches on another; the fast tokenizer's padding state must not leak between them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from streams.encoder import load_encoder
from streams.settings import EmbeddingSettings

pytestmark = pytest.mark.slow

TEXTS = [
    "I adopted a grey cat called Pixel last spring.",
    "ok",
    "We drove to Rotterdam for the data conference and stayed a whole week with Sam, whose knee was better.",
    "Who looks after the cat during the Norway trip?",
]
TEXTS += [" ".join(TEXTS[2:3] * n) for n in (2, 4, 6)]


def test_concurrent_tokenize_and_embed_give_the_sequential_results() -> None:
    enc = load_encoder(EmbeddingSettings())
    want_batch = enc.embed(TEXTS)
    want_counts = enc.count_tokens_batch(TEXTS)
    want_query = enc.embed_one(TEXTS[3])
    errors: list[BaseException] = []

    def hammer(kind: int) -> None:
        try:
            for i in range(40):
                if kind == 0:
                    assert enc.count_tokens_batch(TEXTS[i % 2 :]) == want_counts[i % 2 :]
                elif kind == 1:
                    np.testing.assert_allclose(enc.embed(TEXTS), want_batch, atol=1e-4)
                else:
                    assert float(enc.embed_one(TEXTS[3]) @ want_query) > 0.9999
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k % 3,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
