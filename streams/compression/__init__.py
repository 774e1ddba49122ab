"""Sensory-memory compressors: the offline self-information compressor and the LLMLingua-2 adapter.

The public entry points (``Compressor``, ``load_compressor``, ``compress_turns``) live in
``streams.compress``; this package holds their implementations.
"""
