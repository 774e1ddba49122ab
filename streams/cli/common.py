"""What every ``lightmem`` command group shares: settings from the environment, consoles, errors, progress bars,
the cost table and the one ``Memory`` a command opens."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas import StageCost
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.api import Memory

console = Console()
err = Console(stderr=True)

DATA_DIR_OPT = typer.Option(envvar="LIGHTMEM_DATA_DIR", help="local state directory (DLQ log, Qdrant storage)")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class DataFormat(StrEnum):
    locomo = "locomo"
    longmemeval = "longmemeval"
    jsonl = "jsonl"


def env_help(text: str, variable: str) -> str:
    """An option's help naming the setting it defaults from."""
    return f"{text}; setting {variable}"


def load_settings(data_dir: Path | None = None) -> Settings:
    """``Settings()`` from the LIGHTMEM_* environment, with ``--data-dir`` when given (the store follows it unless
    LIGHTMEM_STORE__PATH is set)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from disk only
    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def override(section: M, **values: object) -> M:
    """``section`` with the command-line values that were given (None = not given, keep the setting)."""
    given = {k: v for k, v in values.items() if v is not None}
    return section.model_validate({**section.model_dump(), **given}) if given else section


def print_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, however long


def fail(message: str, code: int = 2) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )


@contextmanager
def open_memory(settings: Settings) -> Iterator[Memory]:
    """The ``Memory`` every memory command goes through, closed at the end: the server's at ``LIGHTMEM_API__URL``
    when set (a ``MemoryClient``: the same methods over HTTP), else the embedded one."""
    if settings.api.url:
        from streams.client import MemoryClient, ServiceError

        key = settings.api.key.get_secret_value() if settings.api.key is not None else None
        client = MemoryClient(settings.api.url, key)
        try:
            yield cast("Memory", client)  # same methods and return types; the server owns the store
        except ServiceError as e:
            fail(f"{settings.api.url}: {e.detail} ({e.status})")
        finally:
            client.close()
        return
    from streams.api import Memory  # loads torch: `lightmem --help` and `lightmem kafka up` stay fast without it

    m = Memory(settings)
    try:
        yield m
    finally:
        m.close()


def run_broker(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that talks to Kafka, turning a missing broker into a clear error."""
    from streams.kafka.topics import BrokerUnavailable  # aiokafka: only the streaming commands need it

    try:
        return asyncio.run(coro)
    except BrokerUnavailable as e:
        fail(f"{e} (start one with: lightmem kafka up)")


def cost_table(costs: Mapping[str, StageCost], wall_s: float | None = None) -> Table:
    t = Table(title="cost per stage")
    for col in ("stage", "LLM calls", "input tokens", "output tokens", "seconds", "items"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for c in costs.values():
        t.add_row(c.stage, str(c.calls), str(c.input_tokens), str(c.output_tokens), f"{c.seconds:.2f}", str(c.items))
    if wall_s is not None:
        t.caption = f"wall time {wall_s:.1f} s"
    return t
