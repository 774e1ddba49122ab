"""The memory service: ``lightmem serve`` — one process owns the store and serves ``Memory`` over HTTP.

- ``app``: the FastAPI application (``/v1``, ``/healthz``, ``/readyz``, ``/metrics``);
- ``state``: what the process holds (the ``Memory``, the writer thread, keys, limits, the Kafka side);
- ``engine``: the writer thread (every store write, in order; the idle flush);
- ``auth``: keys (hashes only) and tenants; ``ratelimit``: per-key limits; ``batcher``: shared query encoding;
- ``models``/``convert``: the wire format, built from the records in ``schemas``.
"""
