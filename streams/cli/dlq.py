"""``lightmem dlq list|show|redrive``: the dead letters of the embedded log, or with ``--kafka`` of the topic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from schemas import DeadLetter
from streams.cli.common import DATA_DIR_OPT, console, err, fail, load_settings, open_memory, run_broker
from streams.dlq import DeadLetterLog
from streams.redrive import REDRIVABLE, RedriveReport, describe, select
from streams.settings import Settings

app = typer.Typer(
    name="dlq", help="Dead letters: list, show one, redrive after the cause is gone.", no_args_is_help=True
)

STAGE = typer.Option("--stage", help="only this stage (ingest, extract, sink, ...)")
USER = typer.Option("--user", help="only this user's dead letters")
KAFKA = typer.Option("--kafka", help="the dead-letter topic instead of the embedded log")


def _letters(settings: Settings, kafka: bool, stage: str | None, user: str | None) -> list[DeadLetter]:
    if kafka:
        from streams.kafka.dlq import letters  # aiokafka: only with --kafka

        return run_broker(letters(settings, stage, user))
    return select(DeadLetterLog(settings.data_dir / "dead_letters.jsonl").read(), stage, user)


@app.command("list")
def list_(
    stage: Annotated[str | None, STAGE] = None,
    user: Annotated[str | None, USER] = None,
    kafka: Annotated[bool, KAFKA] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """List dead letters: id, stage, user, error, attempts, time, reason."""
    settings = load_settings(data_dir)
    rows = describe(_letters(settings, kafka, stage, user))
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    t = Table(title=f"dead letters ({len(rows)})")
    for col in ("dlq_id", "stage", "user", "error_type", "attempts", "at", "reason"):
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(r[c]) for c in ("dlq_id", "stage", "user", "error_type", "attempts", "at", "reason")))
    console.print(t)


@app.command()
def show(
    dlq_id: Annotated[str, typer.Argument(help="the dead letter's id (from dlq list)")],
    kafka: Annotated[bool, KAFKA] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Print one dead letter in full (reason and original payload)."""
    settings = load_settings(data_dir)
    found = [d for d in _letters(settings, kafka, None, None) if d.dlq_id == dlq_id]
    if not found:
        fail(f"no dead letter {dlq_id}")
    console.print_json(found[0].model_dump_json())


@app.command()
def redrive(
    stage: Annotated[str | None, STAGE] = None,
    user: Annotated[str | None, USER] = None,
    kafka: Annotated[bool, KAFKA] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Reprocess dead letters (extract: the batch again; sink: the summary again; ingest: the turn again)."""
    if stage is not None and stage not in REDRIVABLE:
        fail(f"stage {stage!r} cannot be redriven (redrivable: {', '.join(REDRIVABLE)})")
    settings = load_settings(data_dir)
    report: RedriveReport
    if kafka:
        from streams.kafka.dlq import redrive as redrive_topic  # aiokafka: only with --kafka

        report = run_broker(redrive_topic(settings, stage, user))
    else:
        with open_memory(settings) as m:
            report = m.redrive(stage, user)
    console.print(
        f"redrive: {report.selected} selected, {report.redriven} redriven, {report.failed} failed again, "
        f"{report.skipped} not redrivable; {report.memories} memories written"
    )
    for reason in report.reasons[:5]:
        err.print(f"[yellow]still failing:[/] {reason}")
    if report.failed:
        raise typer.Exit(1)
