"""Building and running the server process (``lightmem serve``): open ``Memory`` once, serve it with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import uvicorn

from streams.api import Memory
from streams.encoder import Encoder, load_encoder
from streams.service.app import create_app
from streams.service.batcher import BatchingEncoder
from streams.service.state import Service
from streams.settings import Settings
from streams.stages import Stages

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_memory(settings: Settings) -> tuple[Memory, BatchingEncoder]:
    """``Memory`` with a micro-batching query encoder in front of the model (concurrent searches share a pass).

    Opening it takes the store's lock: ``StoreBusyError`` when another process owns the store. The models run with
    ``api.torch_threads`` intra-op threads: a server's parallelism is its concurrent requests, and on a small
    machine two threads per pass cost several times one (measured: 8 queries in one pass, 86 ms on one thread,
    476 ms on two, on a loaded 2-core machine)."""
    if settings.api.torch_threads:
        torch.set_num_threads(settings.api.torch_threads)
    encoder = BatchingEncoder(load_encoder(settings.embedding), settings.api.search_batch_window_ms / 1000)
    try:
        memory = Memory(settings, stages=Stages(settings, encoder=cast(Encoder, encoder)))
    except BaseException:
        encoder.close()
        raise
    return memory, encoder


def build_service(settings: Settings, memory: Memory, *, no_auth: bool = False, kafka: bool = False) -> Service:
    streaming = None
    if kafka:
        from streams.service.streaming import KafkaSide  # aiokafka only where streaming is asked for

        streaming = KafkaSide(settings, memory)
    return Service(settings, memory, no_auth=no_auth, streaming=streaming)


def announce(memory: Memory, url: str) -> None:
    """Write the API's URL beside the store's lock, so a second process is told where to go."""
    owner = getattr(memory.pipeline.store, "owner", None)
    if owner is not None:
        owner.set_api_url(url)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(
    settings: Settings, *, host: str, port: int, no_auth: bool = False, kafka: bool = False, log_level: str = "info"
) -> None:
    """Run the API until interrupted. ``--no-auth`` is refused off loopback."""
    if no_auth and not is_loopback(host):
        raise ValueError(f"--no-auth serves without keys, so only on a loopback address, not {host}")
    memory, encoder = open_memory(settings)
    try:
        url = f"http://{host}:{port}"
        announce(memory, url)
        service = build_service(settings, memory, no_auth=no_auth, kafka=kafka)
        config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, access_log=False)
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; end with SystemExit(0) instead
        # of dying from it, so the store below is flushed and its lock released
        signal.signal(signal.SIGTERM, _exit_cleanly)
        uvicorn.Server(config).run()
    finally:
        memory.close()
        encoder.close()


@contextmanager
def serve_in_thread(
    service: Service, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0, *, owner: bool = True
) -> Iterator[str]:
    """Serve ``service`` with uvicorn on a background thread (tests, benchmarks, an app embedding the API);
    yields the base URL once it accepts connections, and stops the server on exit. ``owner``: record the URL as
    where the store is served (see ``announce``)."""
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start on {host}:{port}")
        time.sleep(0.02)
    url = f"http://{host}:{port}"
    if owner:
        announce(service.memory, url)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
