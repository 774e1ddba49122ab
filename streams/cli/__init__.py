"""The ``lightmem`` command line: the root typer app and its command groups, one module each.

- ``embedded`` — demo, ingest, search, schemas (one process, memory on disk);
- ``memory``   — compact (the sleep-time update), memory history|revert, forget (erasure);
- ``stream``   — the streaming deployment: kafka up|down|status, topics, produce, worker, sink, replay;
- ``eval``     — the benchmark evaluation;
- ``service``  — serve (the memory service), keys create|list|revoke, mcp;
- ``common``   — what they share (settings, consoles, errors, progress, the cost table, opening ``Memory``).

Every command that touches memory goes through ``streams.api.Memory``. Options read their LIGHTMEM_* variables
through ``Settings``.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from streams.cli import embedded, memory, service, stream
from streams.cli import eval as evaluation
from streams.cli.common import print_error
from streams.ltm.owner import StoreBusyError


class _App(typer.Typer):
    """The root app; a store owned by another process ends any command with one line, not a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except StoreBusyError as e:
            print_error(str(e))
            sys.exit(2)


app = _App(
    name="lightmem",
    help="LightMem Streams: sensory → short-term → long-term memory for LLM agents, embedded or over Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
for group in (embedded, memory, stream, evaluation, service):
    app.add_typer(group.app)  # a group added without a name: its commands join the top level

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app()
