"""BM25 sparse vectors from text: a small deterministic tokenizer plus BM25 term weights.

Documents carry BM25 term-frequency saturation with length normalisation; queries carry 1.0 per
unique term. The engine multiplies in IDF (sparse vector params with the IDF modifier), so the
dot product of the two is the BM25 score. ``avgdl`` is a fixed constant because the corpus streams.
Term indices are stable 31-bit hashes (blake2b), never Python's salted ``hash()``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from hashlib import blake2b

K1 = 1.2
B = 0.75
AVGDL = 12.0  # typical length of a fact in tokens after stopword removal

_TOKEN = re.compile(r"[a-z0-9]+")

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
    nor not now of off on once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too under until up very
    was we were what when where which while who whom why will with would you your yours yourself yourselves
    s t ll re ve d m""".split()
)


@dataclass(frozen=True)
class Sparse:
    indices: list[int]
    values: list[float]

    def __bool__(self) -> bool:
        return bool(self.indices)


def _stem(word: str) -> str:
    """A light suffix stemmer: plural and common verb endings only."""
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("ing") and len(word) > 5:
        return word[:-3]
    if word.endswith("ed") and len(word) > 4:
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lowercase, split on non-alphanumerics, drop stopwords, stem."""
    return [_stem(w) for w in _TOKEN.findall(text.lower()) if w not in STOPWORDS]


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
