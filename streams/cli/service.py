"""``lightmem`` commands of the memory service: serve, keys create|list|revoke, mcp.

``serve`` is the one process that owns the store and serves ``Memory`` over HTTP (``streams.service``); ``keys``
manages the API keys (their hashes live in ``LIGHTMEM_API__KEYS_FILE``, default ``<data dir>/api_keys.json``);
``mcp`` offers memory as MCP tools on stdio (or streamable HTTP with ``--http``), through the server at
``LIGHTMEM_API__URL`` when set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.table import Table

from streams.cli.common import DATA_DIR_OPT, console, env_help, err, fail, load_settings, open_memory

app = typer.Typer()
keys_app = typer.Typer(help="API keys: each belongs to one tenant; the file keeps only their hashes.")
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help=env_help("listen address", "LIGHTMEM_API__HOST"))] = None,
    port: Annotated[int | None, typer.Option(help=env_help("listen port", "LIGHTMEM_API__PORT"))] = None,
    kafka: Annotated[
        bool, typer.Option("--kafka", help="streaming mode: also the LTM sink and compaction agent; turns to Kafka")
    ] = False,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="no keys (loopback only): serve the embedded namespace as admin")
    ] = False,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Own the store and serve memory over HTTP (/v1, OpenAPI at /openapi.json, /metrics)."""
    from streams.service.run import is_loopback
    from streams.service.run import serve as run_serve

    settings = load_settings(data_dir)
    api = settings.api
    host = host or api.host
    port = api.port if port is None else port
    if no_auth and not is_loopback(host):
        fail(f"--no-auth serves without keys, so only on a loopback address, not {host}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if no_auth:
        err.print(
            f"[yellow]warning:[/] --no-auth: anyone who can reach {host}:{port} reads and erases every memory "
            "of the embedded namespace",
            soft_wrap=True,
        )
    mode = "streaming (LTM sink + compaction agent + API)" if kafka else "embedded"
    err.print(f"lightmem serve: {mode} on http://{host}:{port}, store {settings.store.url or settings.store.path}")
    run_serve(settings, host=host, port=port, no_auth=no_auth, kafka=kafka, log_level=settings.log_level)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key reads and writes (no ':')")],
    admin: Annotated[bool, typer.Option("--admin", help="may erase and compact users, and read costs")] = False,
    note: Annotated[str, typer.Option(help="a note stored beside the hash")] = "",
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Create a key; it is printed once, alone on the last line (only its hash is stored)."""
    from streams.service.auth import KeyStore, keys_path

    settings = load_settings(data_dir)
    store = KeyStore(keys_path(settings.api.keys_file, settings.data_dir))
    try:
        key, row = store.create(tenant, admin=admin, note=note)
    except ValueError as e:
        fail(str(e))
    err.print(f"key {row.key_id} for tenant {row.tenant}{' (admin)' if row.admin else ''} in {store.path}")
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: Annotated[Path | None, DATA_DIR_OPT] = None) -> None:
    """The keys (ids, tenants, rights, dates; never the keys themselves)."""
    from streams.service.auth import KeyStore, keys_path

    settings = load_settings(data_dir)
    store = KeyStore(keys_path(settings.api.keys_file, settings.data_dir))
    t = Table(title=str(store.path))
    for col in ("key id", "tenant", "admin", "created", "revoked", "note"):
        t.add_column(col)
    for r in store.rows():
        revoked = r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else ""
        t.add_row(
            r.key_id, r.tenant, "yes" if r.admin else "", r.created_at.isoformat(timespec="seconds"), revoked, r.note
        )
    console.print(t)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key id (from keys list)")],
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """Revoke a key; a running server refuses it from its next request."""
    from streams.service.auth import KeyStore, keys_path

    settings = load_settings(data_dir)
    try:
        row = KeyStore(keys_path(settings.api.keys_file, settings.data_dir)).revoke(key_id)
    except KeyError as e:
        fail(str(e.args[0]))
    console.print(f"revoked {row.key_id} (tenant {row.tenant})")


@app.command()
def mcp(
    http: Annotated[
        bool, typer.Option("--http", help="serve MCP over streamable HTTP (at /mcp) instead of stdio")
    ] = False,
    host: Annotated[str, typer.Option(help="--http: listen address (loopback only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="--http: listen port")] = 8421,
    data_dir: Annotated[Path | None, DATA_DIR_OPT] = None,
) -> None:
    """MCP tools (add_memory, search_memory, list_memories, forget_user) on stdio, or with --http over streamable
    HTTP at http://HOST:PORT/mcp: through the server at LIGHTMEM_API__URL (with LIGHTMEM_API__KEY) when set, else
    over the embedded store."""
    from streams.mcp_server import MemoryLike, build_server
    from streams.service.run import is_loopback

    if http and not is_loopback(host):
        # the MCP endpoint takes no key of its own: whoever reaches it acts with LIGHTMEM_API__KEY's rights
        fail(f"lightmem mcp --http serves without keys, so only on a loopback address, not {host}")
    settings = load_settings(data_dir)
    with open_memory(settings) as memory:
        server = build_server(cast(MemoryLike, memory))
        if http:
            err.print(f"lightmem mcp: streamable HTTP on http://{host}:{port}/mcp")
            server.run("streamable-http", host=host, port=port)
        else:
            server.run("stdio")
