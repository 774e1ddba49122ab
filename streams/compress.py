"""Sensory memory, step one: compress every turn at keep rate r.

``load_compressor`` picks LLMLingua-2 when ``settings.llmlingua2_model_path`` is set (see
``streams.compression.llmlingua2``), else the model-free ``offline-selfinfo`` compressor (see
``streams.compression.offline`` for the method). ``compress_turns`` is the stage function the
embedded runner and the Faust agent both call: one ``CompressedTurn`` per ``RawTurn``, raw text kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Protocol, runtime_checkable

from schemas.records import CompressedTurn, RawTurn
from streams.settings import CompressionSettings
from streams.tokens import count_tokens

__all__ = ["Compressor", "compress_turns", "load_compressor", "word_count"]


@runtime_checkable
class Compressor(Protocol):
    name: str  # recorded in every CompressedTurn.compressor

    def compress_texts(self, texts: Sequence[str], rate: float) -> list[str]:
        """Compress each text to about ``rate`` of its tokens; same length and order as ``texts``."""
        ...


@lru_cache(maxsize=4)
def _load(model_path: str | None, device: str) -> Compressor:
    if model_path is None:
        from streams.compression.offline import OfflineSelfInfoCompressor

        return OfflineSelfInfoCompressor()
    from streams.compression.llmlingua2 import LLMLingua2Compressor

    return LLMLingua2Compressor(model_path, device=device)


def load_compressor(settings: CompressionSettings) -> Compressor:
    """LLMLingua-2 when a model directory is configured, else the offline compressor; one per process."""
    path = settings.llmlingua2_model_path
    return _load(str(path) if path is not None else None, settings.device)


def word_count(text: str) -> int:
    return len(text.split())


def compress_turns(
    turns: Sequence[RawTurn],
    compressor: Compressor,
    settings: CompressionSettings,
    count_encoder_tokens: Callable[[Sequence[str]], list[int]],
) -> list[CompressedTurn]:
    """One ``CompressedTurn`` per turn, in order.

    Turns of at most ``settings.min_words`` words are kept whole; empty content stays empty; a compressor
    output that comes back empty for a non-empty turn falls back to the raw text. ``count_encoder_tokens``
    (``Encoder.count_tokens_batch``) is called once for the whole batch.
    """
    rate = settings.rate
    compressed = [t.content for t in turns]
    todo = [i for i, t in enumerate(turns) if rate < 1 and word_count(t.content) > settings.min_words]
    if todo:
        results = compressor.compress_texts([turns[i].content for i in todo], rate)
        if len(results) != len(todo):
            raise RuntimeError(f"compressor {compressor.name!r} returned {len(results)} texts for {len(todo)}")
        for i, text in zip(todo, results, strict=True):
            if text.strip():
                compressed[i] = text
    encoder_tokens = count_encoder_tokens(compressed) if compressed else []
    if len(encoder_tokens) != len(compressed):
        raise RuntimeError(f"encoder token counter returned {len(encoder_tokens)} counts for {len(compressed)}")
    return [
        CompressedTurn(
            turn_id=t.turn_id,
            user_id=t.user_id,
            session_id=t.session_id,
            seq=t.seq,
            role=t.role,
            speaker=t.speaker,
            timestamp=t.timestamp,
            source_id=t.source_id,
            raw_text=t.content,
            compressed_text=c,
            compressor=compressor.name,
            rate=rate,
            raw_tokens=count_tokens(t.content),
            compressed_tokens=count_tokens(c),
            encoder_tokens=n,
        )
        for t, c, n in zip(turns, compressed, encoder_tokens, strict=True)
    ]
