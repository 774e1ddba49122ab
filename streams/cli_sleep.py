"""``lightmem`` commands of the sleep-time update: compact, memory history|revert, forget.

Registered on the one typer ``app`` of ``streams.cli`` (imported at the bottom of that module). Embedded mode:
the store under ``--data-dir`` (one owner process at a time), the change log and watermarks beside it.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from streams.cli import DATA_DIR_OPT, _cost_table, _settings, app, console, err, fail, memory, progress

memory_app = typer.Typer(help="The life of long-term memories: history of sleep-time changes, and undoing them.")
app.add_typer(memory_app, name="memory")


def _open_store(settings):  # noqa: ANN001, ANN202 - (store, encoder)
    from streams.encoder import load_encoder
    from streams.ltm import open_store

    encoder = load_encoder(settings.embedding)
    return open_store(settings.store, encoder.dim), encoder


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
    from streams.sleep import Compactor

    settings = _settings(data_dir)
    if kafka:
        _compact_via_kafka(settings, list(user or []), full, as_json)
        return
    t0 = time.perf_counter()
    store, encoder = _open_store(settings)
    try:
        users = list(user) if user else store.users()
        compactor = Compactor(settings, store, encoder.embed)
        with progress() as bar:
            task = bar.add_task(f"compacting ({compactor.model})", total=len(users))
            report = asyncio.run(_run(compactor, users, full, lambda run: bar.advance(task)))
    finally:
        store.close()
    if as_json:
        print(
            json.dumps(
                {
                    "model": compactor.model,
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
            )
        )
        return
    t = Table(title=f"sleep-time update ({compactor.model})")
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
    console.print(_cost_table({"compaction": report.cost}, time.perf_counter() - t0))


def _compact_via_kafka(settings, users: list[str], full: bool, as_json: bool) -> None:  # noqa: ANN001
    from streams.kafka.topics import BrokerUnavailable
    from streams.sleep.kafka_agent import produce_requests

    if full:
        fail("--full is embedded only (the agent owns the watermarks)")
    if not users:
        if not settings.store.url:
            fail("with --kafka name the users (--user U ...): the embedded store belongs to the sink process")
        store, _ = _open_store(settings)  # a Qdrant server: any process may read it
        try:
            users = store.users()
        finally:
            store.close()
    try:
        requests = asyncio.run(produce_requests(settings, users))
    except BrokerUnavailable as e:
        fail(f"{e} (start one with: lightmem kafka up)")
    if as_json:
        print(json.dumps({"requests": [r.model_dump(mode="json") for r in requests]}))
        return
    console.print(
        f"sent {len(requests)} compaction request(s) to {settings.kafka.topics.compaction_requests} "
        f"for: {', '.join(r.user_id for r in requests)}"
    )


async def _run(compactor, users, full, after):  # noqa: ANN001, ANN202
    try:
        return await compactor.run(users, full=full, after_user=after)
    finally:
        await compactor.aclose()


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
    from streams.sleep import ChangeLog

    settings = _settings(data_dir)
    log = ChangeLog.in_dir(settings.data_dir)
    changes = log.for_memory(memory_id)
    caused = log.caused_by(memory_id)
    if user is None and changes:
        user = changes[0].user_id
    current = None
    if user:
        store, _ = _open_store(settings)
        try:
            found = store.get(user, [memory_id])
        finally:
            store.close()
        current = found[0] if found else None
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
    from streams.sleep import ChangeLog, RevertError, apply_changes, build_revert

    settings = _settings(data_dir)
    log = ChangeLog.in_dir(settings.data_dir)
    matches = log.find(change_id)
    if not matches:
        fail(f"no change {change_id} in {log.path}", 1)
    if len(matches) > 1:
        fail(f"{change_id} is ambiguous: {', '.join(c.change_id for c in matches[:5])}")
    change = matches[0]
    store, encoder = _open_store(settings)
    try:
        done = [c for c in log.for_memory(change.memory_id) if c.reverts == change.change_id]
        if done and not force:
            apply_changes(done, store, encoder.embed)  # idempotent: finishes a revert interrupted before applying
            console.print(f"change {change.change_id} was already reverted by {done[-1].change_id}")
            return
        found = store.get(change.user_id, [change.memory_id])
        try:
            rc = build_revert(
                change, found[0] if found else None, datetime.now(UTC), settings.pipeline_version, force=force
            )
        except RevertError as e:
            fail(str(e), 1)
        log.append([rc])
        apply_changes([rc], store, encoder.embed)
    finally:
        store.close()
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
    kafka: Annotated[bool, typer.Option("--kafka", help="send an erase_user command to the control topic")] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Erase a user: memories, buffered turns, session counters, change log entries, watermark, dead letters."""
    from streams.sleep import erase_user

    if not user or not user.strip():
        fail("--user is required (e.g. lightmem forget --user alice)")
    assert user is not None
    if not yes:
        typer.confirm(f"erase everything stored about user {user!r}?", abort=True)
    settings = _settings(data_dir)
    if kafka:
        from streams.kafka.topics import BrokerUnavailable
        from streams.sleep.kafka_agent import produce_erasure

        try:
            rec = asyncio.run(produce_erasure(settings, user))
        except BrokerUnavailable as e:
            fail(f"{e} (start one with: lightmem kafka up)")
        console.print(f"sent erase_user for {user!r} to {settings.kafka.topics.control} at {rec.requested_at:%c}")
        return
    with memory(settings) as m:
        r = erase_user(m, user)
    console.print(
        f"erased user {user!r}: {r.memories} memories, {r.changes} memory changes, "
        f"{'a' if r.watermark else 'no'} compaction watermark, {r.dead_letters} dead letters"
    )
