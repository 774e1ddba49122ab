"""``lightmem`` commands of the streaming shell: produce, worker, sink, replay, topics, kafka up|down|status.

Registered on the one typer ``app`` of ``streams.cli`` (imported at the bottom of that module).
Every option also reads its environment variable; Kafka itself is configured by ``LIGHTMEM_KAFKA__*``
(bootstrap servers, app id, partitions, topic names), as every other setting.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from streams.cli import DATA_DIR_OPT, DataFormat, _settings, app, console, err, fail, progress

KAFKA_SH = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "kafka.sh"

kafka_app = typer.Typer(help="Run the local Apache Kafka broker (KRaft, from Maven jars) for development and tests.")
app.add_typer(kafka_app, name="kafka")


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "httpx", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level.upper())))


def _run(coro):  # noqa: ANN001, ANN202 - run a coroutine, turning a missing broker into a clear error
    from streams.kafka.topics import BrokerUnavailable

    try:
        return asyncio.run(coro)
    except BrokerUnavailable as e:
        fail(f"{e} (start one with: lightmem kafka up)")


def _load_turns(path: Path, fmt: DataFormat, limit: int | None) -> list:
    from streams import loaders

    if fmt is DataFormat.jsonl:
        try:
            return loaders.load_jsonl(path)
        except ValueError as e:
            fail(str(e))
    convs = loaders.load_locomo(path) if fmt is DataFormat.locomo else loaders.load_longmemeval(path)
    return list(loaders.iter_turns(convs[:limit]))


# -- produce ------------------------------------------------------------------------------------------
@app.command()
def produce(
    path: Annotated[Path, typer.Argument(help="data file", exists=True, dir_okay=False)],
    fmt: Annotated[DataFormat, typer.Option("--format", help="input format")] = DataFormat.jsonl,
    limit: Annotated[int | None, typer.Option(help="only the first N conversations/questions")] = None,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Send turns of a LoCoMo / LongMemEval / JSON-lines file to the raw-turn topic (key = user id)."""
    from streams.kafka.produce import produce_turns

    settings = _settings(data_dir)
    turns = _load_turns(path, fmt, limit)
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"producing to {settings.kafka.topics.raw_turns}", total=len(turns))
        n = _run(produce_turns(settings.kafka, turns, progress=lambda k: bar.advance(task, k)))
    users = len({t.user_id for t in turns})
    console.print(
        f"produced {n} turns of {users} users to {settings.kafka.topics.raw_turns} at "
        f"{settings.kafka.bootstrap_servers} in {time.perf_counter() - t0:.1f} s"
    )


# -- topics -------------------------------------------------------------------------------------------
@app.command()
def topics(data_dir: Annotated[Path | None, DATA_DIR_OPT] = None) -> None:
    """Create the pipeline's topics (idempotent) and show them with their configs."""
    from rich.table import Table

    from streams.kafka.topics import ensure_topics, topic_specs

    settings = _settings(data_dir)
    result = _run(ensure_topics(settings.kafka))
    t = Table(title=f"topics at {settings.kafka.bootstrap_servers}")
    for col in ("role", "topic", "partitions", "config", "state"):
        t.add_column(col)
    for s in topic_specs(settings.kafka):
        cfg = ", ".join(f"{k}={v}" for k, v in s.config.items())
        t.add_row(s.role, s.name, str(s.partitions), cfg, result.get(s.name, "?"))
    console.print(t)


# -- worker -------------------------------------------------------------------------------------------
@app.command()
def worker(
    web_port: Annotated[
        int | None,
        typer.Option(envvar="LIGHTMEM_WORKER_WEB_PORT", help="serve Faust's web view on this port (default: off)"),
    ] = None,
    tick_s: Annotated[
        float | None,
        typer.Option(
            envvar="LIGHTMEM_WORKER_TICK_S", help="idle-flush timer interval (default: idle timeout/4, ≤ 1 s)"
        ),
    ] = None,
    standby_replicas: Annotated[
        int, typer.Option(envvar="LIGHTMEM_WORKER_STANDBY_REPLICAS", help="standby table copies on other workers")
    ] = 0,
    session_timeout_s: Annotated[
        float, typer.Option(envvar="LIGHTMEM_WORKER_SESSION_TIMEOUT_S", help="Kafka group session timeout")
    ] = 10.0,
    loglevel: Annotated[LogLevel, typer.Option(envvar="LIGHTMEM_LOGLEVEL", help="log level")] = LogLevel.info,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Run a stream worker (sensory processor + STM aggregator). Start several to scale (≤ partitions)."""
    from streams.kafka.topics import ensure_topics

    settings = _settings(data_dir)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from streams.kafka.topics import BrokerUnavailable

    try:
        loop.run_until_complete(ensure_topics(settings.kafka))
    except BrokerUnavailable as e:
        fail(f"{e} (start one with: lightmem kafka up)")
    from faust import Worker

    from streams.kafka.app import create_shell

    shell = create_shell(
        settings,
        web_port=web_port,
        tick_s=tick_s,
        standby_replicas=standby_replicas,
        session_timeout_s=session_timeout_s,
    )
    err.print(
        f"worker {settings.kafka.app_id} at {settings.kafka.bootstrap_servers}: compressor "
        f"{shell.stages.compressor.name}, extractor {shell.stages.extractor.name}, idle timeout "
        f"{settings.stm.idle_timeout_s} s, web {'port ' + str(web_port) if web_port else 'off'}"
    )
    Worker(shell.app, loop=loop, loglevel=loglevel.value, quiet=True).execute_from_commandline()


# -- sink ---------------------------------------------------------------------------------------------
@app.command()
def sink(
    batch_max: Annotated[int, typer.Option(envvar="LIGHTMEM_SINK_BATCH_MAX", help="records per write batch")] = 256,
    batch_ms: Annotated[int, typer.Option(envvar="LIGHTMEM_SINK_BATCH_MS", help="longest wait for a batch")] = 500,
    idle_exit_s: Annotated[
        float | None, typer.Option(envvar="LIGHTMEM_SINK_IDLE_EXIT_S", help="exit after this long without records")
    ] = None,
    heartbeat_file: Annotated[
        Path | None,
        typer.Option(envvar="LIGHTMEM_SINK_HEARTBEAT_FILE", help="file touched on every poll (liveness probes)"),
    ] = None,
    loglevel: Annotated[LogLevel, typer.Option(envvar="LIGHTMEM_LOGLEVEL", help="log level")] = LogLevel.info,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Run the LTM sink: summaries → memories → the store (the single owner of the local Qdrant storage)."""
    from streams.sleep.kafka_agent import run_sink_with_compaction as run_sink  # + the sleep-time agent

    settings = _settings(data_dir)
    _logging(loglevel.value)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stats = await run_sink(
            settings,
            stop=stop,
            idle_exit_s=idle_exit_s,
            max_records=batch_max,
            timeout_ms=batch_ms,
            heartbeat=heartbeat_file,
        )
        err.print(
            f"sink stopped: {stats.batches} batches, {stats.summaries} summaries, {stats.memories} memories, "
            f"{stats.changes} changes, {stats.dead_letters} dead letters"
        )

    where = settings.store.url or settings.store.path
    err.print(f"LTM sink at {settings.kafka.bootstrap_servers} → {settings.store.collection} in {where}")
    _run(main())


# -- replay -------------------------------------------------------------------------------------------
@app.command()
def replay(
    collection: Annotated[str, typer.Option(help="fresh collection to rebuild memory into")],
    embedder: Annotated[
        Path | None, typer.Option(help="sentence-transformers model directory to embed with (default: settings)")
    ] = None,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Rebuild long-term memory from the raw-turn topic (offset 0 → the end at start) into a new collection."""
    from streams.kafka.replay import CollectionNotEmpty, replay_topic

    settings = _settings(data_dir)
    if embedder is not None and not embedder.exists():
        fail(f"--embedder {embedder} does not exist (a local sentence-transformers model directory)")
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"replaying {settings.kafka.topics.raw_turns}", total=None)

        def advance(n: int, total: int) -> None:
            bar.update(task, total=total, advance=n)

        try:
            report = _run(replay_topic(settings, collection, embedder=embedder, progress=advance))
        except CollectionNotEmpty as e:
            fail(str(e))
    console.print(
        f"replayed {report.turns} turns of {report.users} users from {settings.kafka.topics.raw_turns} into "
        f"{collection}: {len(report.memory_ids)} memories, {report.dead_letters} dead letters, "
        f"{time.perf_counter() - t0:.1f} s"
    )


# -- kafka up|down|status -----------------------------------------------------------------------------
def _kafka_sh(*args: str) -> None:
    if not KAFKA_SH.exists():
        fail(f"{KAFKA_SH} not found (the broker script ships with the source tree)")
    rc = subprocess.call(["bash", str(KAFKA_SH), *args])
    if rc:
        raise typer.Exit(rc)


@kafka_app.command("up")
def kafka_up() -> None:
    """Start the local broker (fetches the jars on first use; idempotent)."""
    _kafka_sh("up")


@kafka_app.command("down")
def kafka_down(purge: Annotated[bool, typer.Option(help="also delete the broker's data")] = False) -> None:
    """Stop the local broker."""
    _kafka_sh("down", *(["--purge"] if purge else []))


@kafka_app.command("status")
def kafka_status() -> None:
    """Exit 0 when the local broker runs, 1 when not."""
    _kafka_sh("status")
