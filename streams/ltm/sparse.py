"""BM25 sparse vectors from text: the shared tokenizer (``streams.text``: stop words, Snowball stems) plus BM25
term weights.

Documents carry BM25 term-frequency saturation with length normalisation; queries carry 1.0 per
unique term. The engine multiplies in IDF (sparse vector params with the IDF modifier), so the
dot product of the two is the BM25 score. ``avgdl`` is a fixed constant because the corpus streams.
Term indices are stable 31-bit hashes (blake2b), never Python's salted ``hash()``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from hashlib import blake2b

from streams.text import tokenize

K1 = 1.2
B = 0.75
AVGDL = 12.0  # typical length of a fact in tokens after stopword removal


@dataclass(frozen=True)
class Sparse:
    indices: list[int]
    values: list[float]

    def __bool__(self) -> bool:
        return bool(self.indices)


@lru_cache(maxsize=65536)
def term_index(term: str) -> int:
    """Stable 31-bit index of a term."""
    return int.from_bytes(blake2b(term.encode("utf-8"), digest_size=4).digest(), "big") & 0x7FFFFFFF


def _merge(weights: dict[int, float]) -> Sparse:
    items = sorted(weights.items())
    return Sparse([i for i, _ in items], [v for _, v in items])


def document_vector(text: str) -> Sparse:
    """BM25 document weights (tf saturation, length-normalised); IDF is applied by the engine."""
    terms = tokenize(text)
    if not terms:
        return Sparse([], [])
    norm = K1 * (1.0 - B + B * len(terms) / AVGDL)
    weights: dict[int, float] = {}
    for term, tf in Counter(terms).items():
        idx = term_index(term)  # hash collisions add up rather than overwrite
        weights[idx] = weights.get(idx, 0.0) + tf * (K1 + 1.0) / (tf + norm)
    return _merge(weights)


def query_vector(text: str) -> Sparse:
    """1.0 per unique query term."""
    return _merge({term_index(t): 1.0 for t in set(tokenize(text))})
