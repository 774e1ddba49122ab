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

__all__ = ["Compressor", "compress_turns", "load_compressor", "turn_rate", "word_count"]


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


def turn_rate(settings: CompressionSettings, raw_tokens: int) -> float:
    """The keep rate of one turn: ``settings.rate``, lowered for a long turn so that about
    ``settings.max_tokens`` tokens remain."""
    if settings.max_tokens is None or raw_tokens <= 0:
        return settings.rate
    return min(settings.rate, settings.max_tokens / raw_tokens)


def compress_turns(
    turns: Sequence[RawTurn],
    compressor: Compressor,
    settings: CompressionSettings,
    count_encoder_tokens: Callable[[Sequence[str]], list[int]],
) -> list[CompressedTurn]:
    """One ``CompressedTurn`` per turn, in order.

    Each turn keeps ``turn_rate`` of its tokens (the rate, or less for a turn longer than ``settings.max_tokens``
    allows); turns of at most ``settings.min_words`` words are kept whole; empty content stays empty; a compressor
    output that comes back empty for a non-empty turn falls back to the raw text. ``count_encoder_tokens``
    (``Encoder.count_tokens_batch``) is called once for the whole batch.
    """
    raw_tokens = [count_tokens(t.content) for t in turns]
    rates = [turn_rate(settings, n) for n in raw_tokens]
    compressed = [t.content for t in turns]
    todo: dict[float, list[int]] = {}  # one compressor call per distinct rate
    for i, t in enumerate(turns):
        if rates[i] < 1 and word_count(t.content) > settings.min_words:
            todo.setdefault(rates[i], []).append(i)
    for rate, rows in todo.items():
        results = compressor.compress_texts([turns[i].content for i in rows], rate)
        if len(results) != len(rows):
            raise RuntimeError(f"compressor {compressor.name!r} returned {len(results)} texts for {len(rows)}")
        for i, text in zip(rows, results, strict=True):
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
            raw_tokens=n_raw,
            compressed_tokens=count_tokens(c),
            encoder_tokens=n,
        )
        for t, c, n, rate, n_raw in zip(turns, compressed, encoder_tokens, rates, raw_tokens, strict=True)
    ]
