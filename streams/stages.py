"""The loaded models and clients every runner needs (``Stages``), each built on first use.

Both runners hold one: the embedded pipeline (``streams.pipeline``) and the Faust worker (``streams.kafka.app``).
Models load lazily, so a process that only searches (``Memory.search``) loads the encoder and never the
compressor or the LLM client.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from schemas import CompressedTurn, RawTurn
from streams import segment as sensory
from streams.compress import Compressor, compress_turns, load_compressor
from streams.encoder import Encoder, load_encoder
from streams.extract import Extractor
from streams.memories import EmbeddingCache
from streams.settings import Settings


class Stages:
    """Encoder, compressor, segmenter and extractor built from ``Settings``; pass ready ones to share them."""

    def __init__(
        self,
        settings: Settings,
        *,
        encoder: Encoder | None = None,
        compressor: Compressor | None = None,
        extractor: Extractor | None = None,
    ) -> None:
        self.settings = settings
        # a given model fills the cached_property's slot, so it is never loaded again
        for name, given in (("encoder", encoder), ("compressor", compressor), ("extractor", extractor)):
            if given is not None:
                self.__dict__[name] = given

    @cached_property
    def encoder(self) -> Encoder:
        return load_encoder(self.settings.embedding)

    @cached_property
    def embed(self) -> EmbeddingCache:
        return EmbeddingCache(self.encoder.embed, self.encoder.dim)

    @cached_property
    def compressor(self) -> Compressor:
        return load_compressor(self.settings.compression)

    @cached_property
    def segmenter(self) -> sensory.Segmenter:
        return sensory.Segmenter(self.settings.segmentation, self.encoder.token_attention, self.embed)

    @cached_property
    def extractor(self) -> Extractor:
        return Extractor(self.settings.llm, self.settings.pipeline_version)

    def load(self) -> Stages:
        """Build every model now (a long-running worker loads them before it takes traffic)."""
        for name in ("encoder", "embed", "compressor", "segmenter", "extractor"):
            getattr(self, name)
        return self

    def loaded(self, name: str) -> bool:
        """Whether the model ``name`` ("encoder", "compressor", "extractor", ...) has been built."""
        return name in self.__dict__

    def compress(self, turns: Sequence[RawTurn]) -> list[CompressedTurn]:
        return compress_turns(turns, self.compressor, self.settings.compression, self.encoder.count_tokens_batch)

    async def aclose(self) -> None:
        """Close the clients that were opened (an extractor never built is not built to be closed)."""
        if self.loaded("extractor"):
            await self.extractor.aclose()
