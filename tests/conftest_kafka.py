"""Fixtures for the integration tests through the real Kafka broker (``@pytest.mark.kafka``).

Load them with ``pytest_plugins = ["tests.conftest_kafka"]`` in ``tests/conftest.py``.

- ``kafka_bootstrap`` (session): the broker address from the settings (``LIGHTMEM_KAFKA__BOOTSTRAP_SERVERS``,
  default 127.0.0.1:9092). The test FAILS with how to start the broker when none answers — it never
  skips into green. ``.ci/run`` starts it (``deploy/kafka/kafka.sh up``).
- ``llm_proc`` (session): the OpenAI-compatible test server (``tests/llm_server.py``) run standalone in a
  subprocess on a free port, so worker subprocesses can reach it; ``llm_proc.url`` / ``.control(...)``.
- ``kafka_env`` (function): a ``KafkaEnv`` with unique topic names and app id for this test, a data dir,
  ``settings``, the ``LIGHTMEM_*`` environment for subprocesses, and helpers to run ``lightmem worker`` /
  ``lightmem sink`` / any ``lightmem`` command as subprocesses, produce, read topics and wait. Its
  processes are stopped and its topics deleted at teardown.
- ``make_kafka_env`` (function): a factory of further ``KafkaEnv``\\ s (module-scoped fixtures can use
  ``KafkaEnv.create`` directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.records import DeadLetter, RawTurn, STMSummary
from streams.settings import (
    KafkaSettings,
    KafkaTopics,
    LLMSettings,
    Settings,
    STMSettings,
    StoreSettings,
    to_env,
)

ROOT = Path(__file__).resolve().parent.parent
LIGHTMEM = Path(sys.executable).parent / "lightmem"
DEFAULT_BOOTSTRAP = KafkaSettings().bootstrap_servers


def bootstrap_from_env() -> str:
    return os.environ.get("LIGHTMEM_KAFKA__BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP)


def run_async(coro: Any) -> Any:
    """Run a coroutine from sync test code (a fresh loop; never inside a running one)."""
    return asyncio.run(coro)


# -- broker -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    from streams.kafka.topics import broker_available

    bootstrap = bootstrap_from_env()
    if not run_async(broker_available(bootstrap, timeout_s=10.0)):
        pytest.fail(
            f"no Kafka broker answers at {bootstrap}. These integration tests need the real broker: start it with "
            "`lightmem kafka up` (or `bash deploy/kafka/kafka.sh up`; .ci/run does this), or point "
            "LIGHTMEM_KAFKA__BOOTSTRAP_SERVERS at one. Run the fast layer alone with -m 'not kafka'.",
            pytrace=False,
        )
    return bootstrap


# -- the LLM test server as a subprocess -----------------------------------------------------------------
class LLMProcess:
    """``python -m tests.llm_server --port 0`` in a subprocess; control over its HTTP endpoints."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.llm_server", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"ready at (\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"the LLM test server did not start; see {log_path}")
        self.base = self.url.rsplit("/v1", 1)[0]

    def control(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base + path, data=data, method="POST" if data is not None else "GET")
        req.add_header("content-type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - local test server
            return json.loads(r.read() or b"{}")

    def reset(self) -> None:
        self.control("/control/reset", {})
        self.control("/control/config", {"latency_s": 0.0})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="session")
def llm_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMProcess]:
    server = LLMProcess(tmp_path_factory.mktemp("llm") / "llm_server.log")
    try:
        yield server
    finally:
        server.stop()


# -- per-test Kafka environment ------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful: the sink commits and closes its store), SIGKILL after the timeout."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL, no clean-up at all (crash test)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)


@dataclass
class KafkaEnv:
    """Unique topics and app id, settings, the subprocess environment, and helpers for one test."""

    name: str
    settings: Settings
    env: dict[str, str]
    data_dir: Path
    procs: list[Proc] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        bootstrap: str,
        llm_url: str | None,
        base_dir: Path,
        *,
        partitions: int = 4,
        threshold_tokens: int = 256,
        idle_timeout_s: float = 2.0,
    ) -> KafkaEnv:
        name = f"t{uuid.uuid4().hex[:10]}"
        topics = KafkaTopics(**{f: f"{name}.{f}" for f in KafkaTopics.model_fields})
        data_dir = base_dir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        llm = (
            LLMSettings(base_url=llm_url, model="test-model", api_key="test-key", timeout_s=10, backoff_s=0.05)
            if llm_url
            else LLMSettings()
        )
        settings = Settings(
            data_dir=data_dir,
            kafka=KafkaSettings(bootstrap_servers=bootstrap, app_id=name, partitions=partitions, topics=topics),
            llm=llm,
            stm=STMSettings(threshold_tokens=threshold_tokens, idle_timeout_s=idle_timeout_s),
            store=StoreSettings(path=data_dir / "qdrant"),
        )
        # the subprocesses see exactly these settings (and no other LIGHTMEM_* variable of this process)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTMEM_")}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **to_env(settings)})
        # the processes run the tree under test, wherever the editable install of the package points
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        return cls(name=name, settings=settings, env=env, data_dir=data_dir)

    # -- processes ---------------------------------------------------------------------------------
    def spawn(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        log_path = self.data_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(
            [str(LIGHTMEM), *args],
            cwd=self.data_dir,
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def worker(self, name: str = "worker", *args: str) -> Proc:
        return self.spawn(name, "worker", *args)

    def sink(self, name: str = "sink", *args: str) -> Proc:
        return self.spawn(name, "sink", "--batch-ms", "300", *args)

    def run_cli(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(LIGHTMEM), *args],
            cwd=self.data_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (rc={p.popen.poll()}):\n{p.tail(60)}" for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.terminate(timeout_s=20)
        with contextlib.suppress(Exception):
            run_async(delete_prefixed_topics(self.settings.kafka, self.name))

    # -- Kafka helpers -----------------------------------------------------------------------------
    @property
    def topics(self) -> KafkaTopics:
        return self.settings.kafka.topics

    def create_topics(self) -> None:
        from streams.kafka.topics import ensure_topics

        run_async(ensure_topics(self.settings.kafka))

    def produce(self, turns: Sequence[RawTurn]) -> int:
        from streams.kafka.produce import produce_turns

        return run_async(produce_turns(self.settings.kafka, turns))

    def produce_raw(self, topic: str, items: Iterable[tuple[bytes | None, bytes | None]]) -> int:
        from streams.kafka.produce import produce_raw

        return run_async(produce_raw(self.settings.kafka, topic, list(items)))

    def read(self, topic: str) -> list[Any]:
        """Every record of a topic, from the beginning to the current end (aiokafka ConsumerRecords)."""
        return run_async(read_topic(self.settings.kafka.bootstrap_servers, topic))

    def summaries(self) -> list[STMSummary]:
        """Valid summaries of the summaries topic, in partition/offset order (malformed ones skipped)."""
        out = []
        for r in self.read(self.topics.summaries):
            with contextlib.suppress(ValidationError):
                out.append(STMSummary.model_validate_json(r.value))
        return out

    def dead_letters(self) -> list[DeadLetter]:
        """Dead letters of the topic, tombstoned ones (an erased user's) left out."""
        tombstoned = {r.key for r in self.read(self.topics.dead_letters) if r.value is None}
        return [
            DeadLetter.model_validate_json(r.value)
            for r in self.read(self.topics.dead_letters)
            if r.value is not None and r.key not in tombstoned
        ]

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float = 120.0, every_s: float = 1.0) -> None:
        """Poll ``check`` until true; fail with the processes' logs on timeout or when one died."""
        from aiokafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except KafkaError as exc:  # e.g. no group coordinator yet on a fresh broker: ask again
                if not getattr(exc, "retriable", False):
                    raise
            dead = [p for p in self.procs if not p.alive() and p.popen.returncode not in (0, -9, -15)]
            if dead:
                pytest.fail(f"while waiting for {what}: {dead[0].name} exited\n{self.logs()}")
            time.sleep(every_s)
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")

    def wait_summaries_cover(self, turn_ids: Iterable[str], timeout_s: float = 150.0) -> list[STMSummary]:
        """Wait until the summaries topic covers every one of ``turn_ids``; returns the summaries."""
        want = set(turn_ids)
        got: list[STMSummary] = []

        def check() -> bool:
            nonlocal got
            got = self.summaries()
            return want <= {t for s in got for t in s.turn_ids}

        self.wait_for(f"summaries covering {len(want)} turns", check, timeout_s)
        return got

    def wait_sink_caught_up(self, timeout_s: float = 90.0) -> None:
        from streams.kafka.topics import consumer_lag, sink_group_id

        k = self.settings.kafka

        def check() -> bool:
            lag = run_async(consumer_lag(k, sink_group_id(k), [k.topics.summaries, k.topics.memory_changes]))
            done = run_async(_committed_any(k, sink_group_id(k)))
            return done and sum(lag.values()) == 0

        self.wait_for("the LTM sink to commit everything", check, timeout_s)

    def wait_group_members(self, n: int, timeout_s: float = 90.0) -> None:
        from streams.kafka.topics import group_members

        self.wait_for(
            f"{n} workers in group {self.name}",
            lambda: run_async(group_members(self.settings.kafka, self.name)) == n,
            timeout_s,
        )


async def _committed_any(kafka: KafkaSettings, group: str) -> bool:
    from streams.kafka.topics import committed_offsets

    return bool(await committed_offsets(kafka, group))


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every record up to the end offsets at the start; raises if they cannot be read in ``timeout_s``."""
    from streams.kafka.topics import partitions_of, read_to_end

    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    if not (await partitions_of(kafka, [topic])).get(topic):
        raise LookupError(f"topic {topic} does not exist at {bootstrap}")
    return await read_to_end(kafka, topic, timeout_s=timeout_s)


async def delete_prefixed_topics(kafka: KafkaSettings, prefix: str) -> None:
    from streams.kafka.topics import admin_client

    admin = admin_client(kafka)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix + ".") or t.startswith(prefix + "-")]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


@pytest.fixture
def make_kafka_env(kafka_bootstrap: str, llm_proc: LLMProcess, tmp_path: Path) -> Iterator[Callable[..., KafkaEnv]]:
    made: list[KafkaEnv] = []

    def make(**kwargs: Any) -> KafkaEnv:
        env = KafkaEnv.create(kafka_bootstrap, llm_proc.url, tmp_path, **kwargs)
        made.append(env)
        return env

    try:
        yield make
    finally:
        for env in made:
            env.close()
        llm_proc.reset()


@pytest.fixture
def kafka_env(make_kafka_env: Callable[..., KafkaEnv]) -> KafkaEnv:
    return make_kafka_env()


# -- the embedded reference ----------------------------------------------------------------------------
def embedded_memories(settings: Settings, turns: Sequence[RawTurn], store_dir: Path) -> dict[str, tuple[str, str]]:
    """Run the embedded pipeline on ``turns`` (ingest all, then flush): ``{memory_id: (kind, text)}``."""
    from streams.pipeline import EmbeddedPipeline

    s = settings.model_copy(
        update={"data_dir": store_dir, "store": settings.store.model_copy(update={"path": store_dir / "qdrant"})}
    )

    async def main() -> dict[str, tuple[str, str]]:
        p = EmbeddedPipeline(s)
        try:
            r = await p.ingest(list(turns))
            r.merge(await p.flush())
            assert not r.dead_letters, r.dead_letters
            return {m.memory_id: (m.kind, m.text) for m in r.memories}
        finally:
            await p.aclose()

    return run_async(main())


def embedded_in_background(settings: Settings, turns: Sequence[RawTurn], store_dir: Path) -> Future:
    """``embedded_memories`` in a thread, so the reference runs while the test waits on the broker."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-reference")
    future = pool.submit(embedded_memories, settings, turns, store_dir)
    pool.shutdown(wait=False)
    return future


def memories_from_summaries(summaries: Iterable[STMSummary], pipeline_version: str) -> dict[str, tuple[str, str]]:
    from streams.memories import summary_to_memories

    return {m.memory_id: (m.kind, m.text) for s in summaries for m in summary_to_memories(s, pipeline_version)}


def store_memories(
    settings: Settings, users: Iterable[str], collection: str | None = None
) -> dict[str, tuple[str, str]]:
    """Open the store (no other process may hold it) and read every memory of the users."""
    from streams.encoder import load_encoder
    from streams.ltm import open_store

    store = open_store(settings.store, load_encoder(settings.embedding).dim, collection=collection)
    try:
        return {m.memory_id: (m.kind, m.text) for u in users for m in store.get_all(u)}
    finally:
        store.close()
