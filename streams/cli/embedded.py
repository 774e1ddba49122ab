"""``lightmem`` embedded commands: demo, ingest, search (one process, memory on disk), and schemas."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.table import Table

from schemas import RawTurn, generate
from streams import ids
from streams.cli.common import (
    DATA_DIR_OPT,
    DataFormat,
    console,
    cost_table,
    err,
    fail,
    load_settings,
    open_memory,
    progress,
)

if TYPE_CHECKING:
    from streams.api import Memory, SearchMode

app = typer.Typer()

DEMO_FILE = Path(__file__).resolve().parent.parent / "data" / "demo_conversation.json"


def ingest_turns(m: Memory, turns: Sequence[RawTurn], label: str, chunk: int = 64) -> None:
    with progress() as bar:
        task = bar.add_task(label, total=len(turns))
        for i in range(0, len(turns), chunk):
            m.add_turns(turns[i : i + chunk])
            bar.advance(task, len(turns[i : i + chunk]))


@app.command()
def demo(
    data_dir: Annotated[Path, DATA_DIR_OPT] = Path(".lightmem/demo"),
    limit: Annotated[int, typer.Option(help="memories shown per search")] = 3,
) -> None:
    """Ingest a short multi-session conversation, show memories with their source turns, search, and costs."""
    t0 = time.perf_counter()
    spec = json.loads(DEMO_FILE.read_text())
    user = spec["user_id"]
    turns: list[RawTurn] = []
    for sess in spec["sessions"]:
        start = datetime.fromisoformat(sess["started_at"])
        for seq, t in enumerate(sess["turns"]):
            turns.append(
                RawTurn(
                    turn_id=ids.turn_id(user, sess["session_id"], seq),
                    user_id=user,
                    session_id=sess["session_id"],
                    seq=seq,
                    role=t["role"],
                    speaker=t.get("speaker"),
                    content=t["content"],
                    timestamp=start + timedelta(minutes=2 * seq),
                )
            )
    by_id = {t.turn_id: t for t in turns}
    settings = load_settings(data_dir)
    with open_memory(settings) as m:
        m.erase(user)
        info = m.info()
        console.print(
            f"[bold]LightMem Streams demo[/] — user [cyan]{user}[/], {len(turns)} turns in {len(spec['sessions'])} "
            f"sessions; compressor [cyan]{info.compressor}[/] at rate "
            f"{settings.compression.rate}, extractor [cyan]{info.extractor}[/]"
        )
        ingest_turns(m, turns, "ingesting", chunk=9)
        m.flush(user)
        records = m.get_all(user)
        t = Table(title=f"long-term memories of {user} ({len(records)})", show_lines=False)
        t.add_column("kind")
        t.add_column("memory")
        t.add_column("source turns")
        for r in records:
            src = "; ".join(
                f"{by_id[s].session_id}#{by_id[s].seq} {by_id[s].speaker or by_id[s].role}"
                for s in r.source_turn_ids[:3]
            )
            if len(r.source_turn_ids) > 3:
                src += f" (+{len(r.source_turn_ids) - 3})"
            t.add_row(r.kind, r.text, src)
        console.print(t)
        for q in spec["searches"]:
            console.print(f"\n[bold]search:[/] {q}")
            for hit in m.search(q, user_id=user, limit=limit):
                first = by_id[hit.record.source_turn_ids[0]]
                console.print(
                    f"  {hit.score:.3f}  {hit.record.text}\n"
                    f"         [dim]from {first.session_id}#{first.seq} ({first.timestamp:%Y-%m-%d}): "
                    f"{first.content[:90]}[/]"
                )
        console.print(cost_table(m.costs(), time.perf_counter() - t0))


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="data file", exists=True, dir_okay=False)],
    fmt: Annotated[DataFormat, typer.Option("--format", help="input format")] = DataFormat.jsonl,
    limit: Annotated[int | None, typer.Option(help="only the first N conversations/questions")] = None,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Ingest a LoCoMo / LongMemEval file or our JSON-lines turns into embedded memory."""
    from streams import loaders  # the benchmark loaders: only this command needs them

    settings = load_settings(data_dir)
    t0 = time.perf_counter()
    if fmt is DataFormat.jsonl:
        try:
            groups = {"": loaders.load_jsonl(path)}
        except ValueError as e:
            fail(str(e))
    else:
        convs = loaders.load_locomo(path) if fmt is DataFormat.locomo else loaders.load_longmemeval(path)
        groups = {c.user_id: c.turns for c in convs[:limit]}
    n = 0
    with open_memory(settings) as m:
        for user, turns in groups.items():
            ingest_turns(m, turns, f"ingesting {user or path.name}")
            n += len(turns)
        m.flush()
        users = sorted({t.user_id for turns in groups.values() for t in turns})
        counts = {u: len(m.get_all(u)) for u in users}
        console.print(f"ingested {n} turns for {len(users)} users; memories: {counts}")
        dl = len(m.dead_letters())
        if dl:
            err.print(f"[yellow]{dl} dead letters in {settings.data_dir / 'dead_letters.jsonl'}[/]")
        console.print(cost_table(m.costs(), time.perf_counter() - t0))


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="what to look for")],
    user: Annotated[str | None, typer.Option("--user", "-u", help="user whose memory is searched (required)")] = None,
    limit: Annotated[int, typer.Option(help="number of memories")] = 10,
    mode: Annotated[str | None, typer.Option(help="hybrid | dense | sparse (default from settings)")] = None,
    since: Annotated[datetime | None, typer.Option(help="only memories of events at or after this time (ISO)")] = None,
    until: Annotated[datetime | None, typer.Option(help="only memories of events at or before this time (ISO)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Search one user's long-term memory."""
    if not user or not user.strip():
        fail("--user is required: memory is always searched for one user (e.g. lightmem search 'cat' --user alice)")
    if mode not in (None, "hybrid", "dense", "sparse"):
        fail(f"--mode must be hybrid, dense or sparse, not {mode!r}")
    for name, ts in (("since", since), ("until", until)):
        if ts is not None and ts.tzinfo is None:
            fail(f"--{name} needs a timezone offset, e.g. 2023-05-08T00:00:00+00:00")
    settings = load_settings(data_dir)
    with open_memory(settings) as m:
        hits = m.search(query, user, limit, mode=cast("SearchMode | None", mode), time_from=since, time_to=until)
    if as_json:
        for h in hits:
            print(json.dumps({"score": h.score, **h.record.model_dump(mode="json")}))
        return
    if not hits:
        console.print(f"no memories found for user {user!r}")
    for h in hits:
        r = h.record
        console.print(
            f"{h.score:.3f} [{r.kind}] {r.text}  [dim]({len(r.source_turn_ids)} source turns, {r.memory_id})[/]"
        )


@app.command()
def schemas(write: Annotated[bool, typer.Option(help="rewrite the JSON Schema files")] = False) -> None:
    """Check (or rewrite) the JSON Schema files generated from the record models."""
    if write:
        console.print(f"wrote {len(generate.write())} schema files")
        return
    stale = generate.stale()
    if stale:
        fail("stale JSON schemas: " + ", ".join(stale) + " (run lightmem schemas --write)", 1)
    console.print("JSON schemas up to date")
