"""The ONNX Runtime encoder gives PyTorch's vectors (cosine >= 0.99) on benchmark texts, for queries and batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import streams.encoder as encoder_module
from streams.encoder import Encoder, packaged_minilm_path
from streams.loaders import load_locomo
from streams.onnx_encoder import mean_pooled

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "locomo10_dev.json"


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    if DATA.exists():
        convs = load_locomo(DATA)
        turns = [f"{t.speaker}: {t.content}" for c in convs for t in c.turns[:40]]
        questions = [qa.question for c in convs for qa in c.qa[:20]]
    else:  # the repository alone: texts of the same kind
        turns = [f"Ann: I adopted a puppy called Max in week {i}, he loves the beach." for i in range(50)]
        questions = [f"When did Ann adopt a puppy, question {i}?" for i in range(30)]
    return turns, questions


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    enc = Encoder(packaged_minilm_path(), batch_size=8)
    assert enc.onnx is not None, "the packaged MiniLM qualifies for the ONNX encoder"
    return enc


def _torch(enc: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enc, "onnx", None)


def test_minilm_is_mean_pooled_and_normalised() -> None:
    assert mean_pooled(packaged_minilm_path())
    assert not mean_pooled(Path("/nonexistent"))


def test_query_vectors_equal_pytorch(encoder: Encoder, texts, monkeypatch: pytest.MonkeyPatch) -> None:
    _, questions = texts
    onnx = np.stack([encoder.embed_one(q) for q in questions])
    _torch(encoder, monkeypatch)
    ref = np.stack([encoder.embed_one(q) for q in questions])
    assert onnx.dtype == np.float32 and onnx.shape == ref.shape
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    assert float((onnx * ref).sum(axis=1).min()) >= 0.99


def test_batch_vectors_equal_pytorch_whatever_the_padding(encoder: Encoder, texts, monkeypatch) -> None:
    turns, questions = texts
    mixed = turns + questions  # lengths differ: padded batches must pool over real tokens only
    onnx = encoder.embed(mixed)
    monkeypatch.setattr(encoder_module, "ONNX_BATCHES", False)
    ref = encoder.embed(mixed)
    assert float((onnx * ref).sum(axis=1).min()) >= 0.99
    # a text embeds the same alone and in a batch
    assert float(onnx[0] @ encoder.embed_one(mixed[0])) >= 0.999
