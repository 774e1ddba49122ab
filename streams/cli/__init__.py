"""The ``lightmem`` command line: the root typer app and its command groups, one module each.

- ``embedded`` — demo, ingest, search, schemas (one process, memory on disk);
- ``memory``   — compact (the sleep-time update), memory history|revert, forget (erasure);
- ``stream``   — the streaming deployment: kafka up|down|status, topics, produce, worker, sink, replay;
- ``eval``     — the benchmark evaluation;
- ``common``   — what they share (settings, consoles, errors, progress, the cost table, opening ``Memory``).

Every command that touches memory goes through ``streams.api.Memory``. Options read their LIGHTMEM_* variables
through ``Settings``.
"""

from __future__ import annotations

import typer

from streams.cli import embedded, memory, stream
from streams.cli import eval as evaluation

app = typer.Typer(
    name="lightmem",
    help="LightMem Streams: sensory → short-term → long-term memory for LLM agents, embedded or over Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
for group in (embedded, memory, stream, evaluation):
    app.add_typer(group.app)  # a group added without a name: its commands join the top level

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app()
