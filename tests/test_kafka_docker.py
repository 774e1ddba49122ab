"""The LoCoMo test through the official ``apache/kafka`` image in a testcontainer instead of the local broker.

It needs a Docker engine; where none answers it is skipped with the reason (the same path runs against the
local broker in test_kafka_pipeline.py, which never skips).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

import tests.conftest as _root
from tests.conftest_kafka import (
    KafkaEnv,
    LLMProcess,
    embedded_in_background,
    run_async,
    store_memories,
)
from tests.test_deploy import kafka_version

if not hasattr(_root, "llm_proc"):  # until tests/conftest.py loads tests.conftest_kafka itself
    from tests.conftest_kafka import llm_proc  # noqa: F401

IMAGE = f"apache/kafka:{kafka_version()}"


def docker_engine() -> str | None:
    """None when a Docker engine answers, else why not."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means no engine
        return f"{type(exc).__name__}: {exc}"


NO_ENGINE = docker_engine()
pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        NO_ENGINE is not None, reason=f"no Docker engine answers ({NO_ENGINE}); testcontainers needs one to run {IMAGE}"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kafka_container() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    port = free_port()  # fixed host port: the broker must advertise the address clients connect to
    container = (
        DockerContainer(IMAGE)
        .with_bind_ports(9092, port)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{port}")
        .with_env("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
    )
    container.start()
    try:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        from streams.kafka.topics import broker_available

        bootstrap = f"127.0.0.1:{port}"
        assert run_async(broker_available(bootstrap, timeout_s=30)), f"{IMAGE} does not answer at {bootstrap}"
        yield bootstrap
    finally:
        container.stop()


def test_locomo_session_through_apache_kafka_image(
    kafka_container: str, llm_proc: LLMProcess, locomo_conversations: Any, tmp_path: Any
) -> None:
    conv = next(c for c in locomo_conversations if c.user_id.endswith("conv-30")).turns
    first = conv[0].session_id
    turns = [t for t in conv if t.session_id == first]
    env = KafkaEnv.create(kafka_container, llm_proc.url, tmp_path)
    try:
        env.create_topics()
        worker, sink = env.worker(), env.sink()
        reference = embedded_in_background(env.settings, turns, env.data_dir / "embedded")
        env.produce(turns)
        env.wait_summaries_cover([t.turn_id for t in turns])
        env.wait_sink_caught_up()
        assert sink.terminate() == 0, sink.tail()
        worker.terminate()
        got = store_memories(env.settings, {t.user_id for t in turns})
        assert got == reference.result(timeout=300)
    finally:
        env.close()
