"""``lightmem`` commands of the streaming deployment: produce, worker, sink, replay, topics, kafka up|down|status.

Options default from ``Settings`` (``LIGHTMEM_WORKER__*``, ``LIGHTMEM_SINK__*``, ``LIGHTMEM_LOG_LEVEL``); Kafka
itself is configured by ``LIGHTMEM_KAFKA__*`` (bootstrap servers, app id, partitions, topic names), as every
other setting. The Kafka and Faust modules are imported inside the commands, so the embedded commands never
load them.
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
from rich.table import Table

from schemas import RawTurn
from streams import metrics
from streams.cli.common import (
    DATA_DIR_OPT,
    DataFormat,
    console,
    env_help,
    err,
    fail,
    load_settings,
    override,
    progress,
    run_broker,
)

KAFKA_SH = Path(__file__).resolve().parent.parent.parent / "deploy" / "kafka" / "kafka.sh"

app = typer.Typer()
kafka_app = typer.Typer(help="Run the local Apache Kafka broker (KRaft, from Maven jars) for development and tests.")
app.add_typer(kafka_app, name="kafka")


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LOG_LEVEL_OPT = typer.Option("--loglevel", help=env_help("log level", "LIGHTMEM_LOG_LEVEL"))


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "httpx", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level.upper())))


def _load_turns(path: Path, fmt: DataFormat, limit: int | None) -> list[RawTurn]:
    from streams import loaders  # the benchmark loaders: only the commands reading files need them

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

    settings = load_settings(data_dir)
    turns = _load_turns(path, fmt, limit)
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"producing to {settings.kafka.topics.raw_turns}", total=len(turns))
        n = run_broker(produce_turns(settings.kafka, turns, progress=lambda k: bar.advance(task, k)))
    users = len({t.user_id for t in turns})
    console.print(
        f"produced {n} turns of {users} users to {settings.kafka.topics.raw_turns} at "
        f"{settings.kafka.bootstrap_servers} in {time.perf_counter() - t0:.1f} s"
    )


# -- topics -------------------------------------------------------------------------------------------
@app.command()
def topics(data_dir: Annotated[Path | None, DATA_DIR_OPT] = None) -> None:
    """Create the pipeline's topics (idempotent) and show them with their configs."""
    from streams.kafka.topics import ensure_topics, topic_specs

    settings = load_settings(data_dir)
    result = run_broker(ensure_topics(settings.kafka))
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
        typer.Option(help=env_help("serve Faust's web view on this port (default: off)", "LIGHTMEM_WORKER__WEB_PORT")),
    ] = None,
    tick_s: Annotated[
        float | None,
        typer.Option(
            help=env_help("idle-flush timer interval (default: idle timeout/4, ≤ 1 s)", "LIGHTMEM_WORKER__TICK_S")
        ),
    ] = None,
    standby_replicas: Annotated[
        int | None,
        typer.Option(
            help=env_help("standby table copies on other workers", "LIGHTMEM_WORKER__STANDBY_REPLICAS"), min=0
        ),
    ] = None,
    session_timeout_s: Annotated[
        float | None,
        typer.Option(help=env_help("Kafka group session timeout", "LIGHTMEM_WORKER__SESSION_TIMEOUT_S")),
    ] = None,
    loglevel: Annotated[LogLevel | None, LOG_LEVEL_OPT] = None,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Run a stream worker (sensory processor + STM aggregator). Start several to scale (≤ partitions)."""
    settings = load_settings(data_dir)
    w = override(
        settings.worker,
        web_port=web_port,
        tick_s=tick_s,
        standby_replicas=standby_replicas,
        session_timeout_s=session_timeout_s,
    )
    level = loglevel.value if loglevel else settings.log_level
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from faust import Worker

    from streams.kafka.app import create_shell
    from streams.kafka.topics import BrokerUnavailable, ensure_topics

    try:
        loop.run_until_complete(ensure_topics(settings.kafka))
    except BrokerUnavailable as e:
        fail(f"{e} (start one with: lightmem kafka up)")
    shell = create_shell(
        settings,
        web_port=w.web_port,
        tick_s=w.tick_s,
        standby_replicas=w.standby_replicas,
        session_timeout_s=w.session_timeout_s,
    )
    shell.stages.load()  # models load before the worker joins the group, not on its first message
    err.print(
        f"worker {settings.kafka.app_id} at {settings.kafka.bootstrap_servers}: compressor "
        f"{shell.stages.compressor.name}, extractor {shell.stages.extractor.name}, idle timeout "
        f"{settings.stm.idle_timeout_s} s, web {'port ' + str(w.web_port) if w.web_port else 'off'}"
    )
    if w.metrics_port:
        metrics.serve(w.metrics_port, w.metrics_host)  # stage latency, LLM calls/tokens, dead letters, lag
    Worker(shell.app, loop=loop, loglevel=level, quiet=True).execute_from_commandline()


# -- sink ---------------------------------------------------------------------------------------------
@app.command()
def sink(
    batch_max: Annotated[
        int | None, typer.Option(help=env_help("records per write batch", "LIGHTMEM_SINK__BATCH_MAX"), min=1)
    ] = None,
    batch_ms: Annotated[
        int | None, typer.Option(help=env_help("longest wait for a batch (ms)", "LIGHTMEM_SINK__BATCH_MS"), min=1)
    ] = None,
    idle_exit_s: Annotated[
        float | None,
        typer.Option(help=env_help("exit after this long without records", "LIGHTMEM_SINK__IDLE_EXIT_S")),
    ] = None,
    heartbeat_file: Annotated[
        Path | None,
        typer.Option(help=env_help("file touched on every poll (liveness probes)", "LIGHTMEM_SINK__HEARTBEAT_FILE")),
    ] = None,
    loglevel: Annotated[LogLevel | None, LOG_LEVEL_OPT] = None,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Run the LTM sink: summaries → memories → the store (the single owner of the local Qdrant storage)."""
    from streams.sleep.kafka_agent import run_sink_with_compaction as run_sink  # + the sleep-time agent

    settings = load_settings(data_dir)
    cfg = override(
        settings.sink, batch_max=batch_max, batch_ms=batch_ms, idle_exit_s=idle_exit_s, heartbeat_file=heartbeat_file
    )
    _logging(loglevel.value if loglevel else settings.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stats = await run_sink(
            settings,
            stop=stop,
            idle_exit_s=cfg.idle_exit_s,
            max_records=cfg.batch_max,
            timeout_ms=cfg.batch_ms,
            heartbeat=cfg.heartbeat_file,
        )
        err.print(
            f"sink stopped: {stats.batches} batches, {stats.summaries} summaries, {stats.memories} memories, "
            f"{stats.changes} changes, {stats.dead_letters} dead letters"
        )

    if settings.sink.metrics_port:
        metrics.serve(settings.sink.metrics_port, settings.sink.metrics_host)
    where = settings.store.url or settings.store.path
    err.print(f"LTM sink at {settings.kafka.bootstrap_servers} → {settings.store.collection} in {where}")
    run_broker(main())


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

    settings = load_settings(data_dir)
    if embedder is not None and not embedder.exists():
        fail(f"--embedder {embedder} does not exist (a local sentence-transformers model directory)")
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"replaying {settings.kafka.topics.raw_turns}", total=None)

        def advance(n: int, total: int) -> None:
            bar.update(task, total=total, advance=n)

        try:
            report = run_broker(replay_topic(settings, collection, embedder=embedder, progress=advance))
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
