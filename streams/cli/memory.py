"""``lightmem`` commands on long-term memory's life: compact (the sleep-time update), memory history|revert,
and forget (erasure).

Every embedded command goes through ``streams.api.Memory`` (the store under ``--data-dir``, one owner process at a
time; the change log and watermarks beside it). With ``--kafka``, ``compact`` and ``forget`` send requests to the
compaction and control topics instead (the sink process runs them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from streams.cli.common import (
    DATA_DIR_OPT,
    console,
    cost_table,
    err,
    fail,
    load_settings,
    open_memory,
    progress,
    run_broker,
)
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.api import CompactionReport

# ``streams.api`` (the openai client, the models) is imported inside the commands that open a Memory, so that
# ``lightmem --help`` and the streaming commands start without it.

app = typer.Typer()
memory_app = typer.Typer(help="The life of long-term memories: history of sleep-time changes, and undoing them.")
app.add_typer(memory_app, name="memory")


def _short(text: str | None, n: int = 70) -> str:
    if text is None:
        return "—"
    return text if len(text) <= n else text[: n - 1] + "…"


# -- compact ------------------------------------------------------------------------------------------
@app.command()
def compact(
    user: Annotated[
        list[str] | None, typer.Option("--user", "-u", help="compact only this user (repeatable); default: all")
    ] = None,
    full: Annotated[bool, typer.Option(help="ignore the watermarks: examine every memory again")] = False,
    kafka: Annotated[
        bool,
        typer.Option(
            "--kafka",
            help="send compaction requests to the compaction topic (the sink process's compaction agent runs them)",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the run report as JSON")] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Run the sleep-time update now: new memories × their nearest earlier ones → update/delete/ignore.

    Embedded by default (this process opens the store); with --kafka, one request per user goes to the
    compaction topic instead."""
    settings = load_settings(data_dir)
    users = list(user or [])
    if kafka:
        _compact_via_kafka(settings, users, full, as_json)
        return
    t0 = time.perf_counter()
    with open_memory(settings) as m:
        todo = users or m.users()
        with progress() as bar:
            task = bar.add_task("compacting", total=len(todo))
            report = m.compact(todo, full=full, after_user=lambda run: bar.advance(task))
    if as_json:
        print(json.dumps(_report_json(report)))
        return
    t = Table(title=f"sleep-time update ({report.model})")
    for col in ("user", "new memories", "candidates", "updated", "deleted", "ignored", "dead letters", "watermark"):
        t.add_column(col, justify="left" if col in ("user", "watermark") else "right")
    for u in sorted(report.users, key=lambda r: r.user_id):
        a = u.actions
        mark = f"{u.watermark_after:%Y-%m-%d %H:%M:%S}" if u.watermark_after else "—"
        t.add_row(
            u.user_id,
            str(u.targets),
            str(u.candidates),
            str(a["update"]),
            str(a["delete"]),
            str(a["ignore"]),
            str(len(u.dead_letters)),
            mark,
        )
    console.print(t)
    if report.dead_letters:
        err.print(f"[yellow]{len(report.dead_letters)} dead letters in {settings.data_dir / 'dead_letters.jsonl'}[/]")
    console.print(cost_table({"compaction": report.cost}, time.perf_counter() - t0))


def _report_json(report: CompactionReport) -> dict[str, object]:
    return {
        "model": report.model,
        "users": [
            {
                "user_id": u.user_id,
                "targets": u.targets,
                "candidates": u.candidates,
                "actions": dict(u.actions),
                "dead_letters": len(u.dead_letters),
                "watermark": u.watermark_after.isoformat() if u.watermark_after else None,
            }
            for u in report.users
        ],
        "cost": report.cost.model_dump(mode="json"),
    }


def _compact_via_kafka(settings: Settings, users: list[str], full: bool, as_json: bool) -> None:
    from streams.kafka.compaction import produce_requests  # aiokafka: only with --kafka

    if full:
        fail("--full is embedded only (the agent owns the watermarks)")
    if not users:
        if not settings.store.url:
            fail("with --kafka name the users (--user U ...): the embedded store belongs to the sink process")
        with open_memory(settings) as m:  # a Qdrant server: any process may read it
            users = m.users()
    requests = run_broker(produce_requests(settings, users))
    if as_json:
        print(json.dumps({"requests": [r.model_dump(mode="json") for r in requests]}))
        return
    console.print(
        f"sent {len(requests)} compaction request(s) to {settings.kafka.topics.compaction_requests} "
        f"for: {', '.join(r.user_id for r in requests)}"
    )


# -- memory history | revert --------------------------------------------------------------------------
@memory_app.command("history")
def history(
    memory_id: Annotated[str, typer.Argument(help="the memory's id")],
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="its user (found in the change log if omitted)")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print JSON lines: the current record, then each change")
    ] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Show the life of one memory: its current state and every sleep-time change to it, deletes included."""
    settings = load_settings(data_dir)
    with open_memory(settings) as m:
        changes = m.history(memory_id)
        if user is None and changes:
            user = changes[0].user_id
        view = m.get(memory_id, user) if user else None
    current = view.record if view else None
    caused = view.caused if view else []
    if current is None and not changes:
        hint = "" if user else " (pass --user to look the memory up in the store)"
        fail(f"no memory {memory_id} and no change to it{hint}", 1)
    if as_json:
        print(json.dumps({"current": current.model_dump(mode="json") if current else None}))
        for c in changes:
            print(c.model_dump_json())
        return
    if current is not None:
        console.print(
            f"[bold]{memory_id}[/] ({current.kind}, user {current.user_id}) version {current.version}, "
            f"created {current.created_at:%Y-%m-%d %H:%M:%S}, updated {current.updated_at:%Y-%m-%d %H:%M:%S}\n"
            f"  {current.text}\n  [dim]{len(current.source_turn_ids)} source turns[/]"
        )
    else:
        last = changes[-1]
        console.print(
            f"[bold]{memory_id}[/] (user {last.user_id}) is [red]not in the store[/] (last change: {last.action})"
        )
    for turn in view.source_turns if view else []:
        said = f"{turn.timestamp:%Y-%m-%d %H:%M} {turn.session_id}#{turn.seq} {turn.speaker or turn.role}:"
        console.print(f"  [dim]{escape(said)}[/] {escape(_short(turn.text))}")
    first = changes[0].old_record if changes else None
    if first is not None:
        console.print(f"  [dim]created {first.created_at:%Y-%m-%d %H:%M:%S} as:[/] {first.text}")
    t = Table(title=f"changes ({len(changes)})")
    for col in ("at", "action", "version", "text", "reason", "caused by", "change id", "model"):
        t.add_column(col)
    for c in changes:
        ver = f"{c.old_version or '—'} → {c.new_version or '—'}" if c.action != "ignore" else str(c.old_version or "")
        text = _short(c.new_text) if c.action in ("update", "revert") else _short(c.old_text)
        t.add_row(
            f"{c.at:%Y-%m-%d %H:%M:%S}",
            c.action + (f" of {c.reverts[:8]}" if c.reverts else ""),
            ver,
            text,
            _short(c.reason, 50),
            ", ".join(m[:8] for m in c.caused_by),
            c.change_id,
            c.model,
        )
    console.print(t)
    if caused:
        console.print(f"[dim]it also caused {len(caused)} change(s) to other memories:[/]")
        for c in caused:
            console.print(f"  {c.at:%Y-%m-%d %H:%M:%S} {c.action} {c.memory_id}  [dim]{c.change_id}[/]")


@memory_app.command("revert")
def revert(
    change_id: Annotated[str, typer.Argument(help="the change to undo (its id, or an unambiguous prefix)")],
    force: Annotated[bool, typer.Option(help="revert even if the memory changed since")] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Undo a sleep-time change: restore the memory as it was before (re-embedded, same id); logged as a 'revert'."""
    from streams.api import AmbiguousChange, ChangeNotFound, RevertError

    settings = load_settings(data_dir)
    with open_memory(settings) as m:
        try:
            result = m.revert(change_id, force=force)
        except ChangeNotFound as e:
            fail(str(e), 1)
        except AmbiguousChange as e:
            fail(str(e))
        except RevertError as e:
            fail(str(e), 1)
    change, rc = result.reverted, result.revert
    if result.already:
        console.print(f"change {change.change_id} was already reverted by {rc.change_id}")
        return
    what = "restored" if rc.new_record is not None else "removed again"
    console.print(
        f"reverted {change.action} {change.change_id}: memory {change.memory_id} {what}"
        + (f" (version {rc.new_version}): {rc.new_text}" if rc.new_record is not None else "")
        + f"\n[dim]revert change {rc.change_id}[/]"
    )


# -- forget -------------------------------------------------------------------------------------------
@app.command()
def forget(
    user: Annotated[str | None, typer.Option("--user", "-u", help="the user to erase (required)")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    kafka: Annotated[
        bool, typer.Option("--kafka", help="erase over Kafka: shred the user's keys, send the erasure barrier")
    ] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Erase a user: memories, buffered turns, session counters, change log entries, watermark, dead letters."""
    if not user or not user.strip():
        fail("--user is required (e.g. lightmem forget --user alice)")
    if not yes:
        typer.confirm(f"erase everything stored about user {user!r}?", abort=True)
    settings = load_settings(data_dir)
    if kafka:
        from streams.kafka.erasure import produce_erasure  # aiokafka: only with --kafka

        rec = run_broker(produce_erasure(settings, user))
        console.print(
            f"erased {user!r}: keys shredded, erase_user sent through {settings.kafka.topics.raw_turns} "
            f"and {settings.kafka.topics.control} at {rec.requested_at:%c}"
        )
        return
    with open_memory(settings) as m:
        r = m.erase(user)
    console.print(
        f"erased user {user!r}: {r.memories} memories, {r.changes} memory changes, "
        f"{'a' if r.watermark else 'no'} compaction watermark, {r.dead_letters} dead letters"
    )
