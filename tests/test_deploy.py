"""The deployment files agree with the product: docker-compose.yml, deploy/Dockerfile and deploy/k8s/*.yaml.

Parsed with PyYAML; every container command is checked against the real ``lightmem`` CLI (the typer app,
introspected), every LIGHTMEM_* variable against the Settings model or a CLI option's envvar.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from streams.cli import app
from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
POM = ROOT / "deploy" / "kafka" / "pom.xml"
IMAGE = "lightmem-streams:0.1.0"


# -- the CLI and the settings, introspected ---------------------------------------------------------------
def cli_commands() -> dict[str, Any]:
    group = typer.main.get_command(app)
    out: dict[str, Any] = {}
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        out[name] = cmd
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            out[f"{name} {sub}"] = subcmd
    return out


def cli_envvars() -> set[str]:
    names: set[str] = set()
    for cmd in cli_commands().values():
        for p in cmd.params:
            env = getattr(p, "envvar", None)
            if isinstance(env, str):
                names.add(env)
            elif env:
                names.update(env)
    return names


def check_lightmem_args(args: list[str]) -> None:
    """``args`` (what follows the ``lightmem`` entrypoint) is a real subcommand with real options."""
    assert args, "no command"
    cmds = cli_commands()
    name = args[0]
    assert name in cmds, f"{name!r} is not a lightmem subcommand (have {sorted(cmds)})"
    cmd = cmds[name]
    opts: dict[str, Any] = {}
    for p in cmd.params:
        for o in [*p.opts, *p.secondary_opts]:
            opts[o] = p
    rest = args[1:]
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            assert flag in opts, f"lightmem {name}: unknown option {flag} (have {sorted(opts)})"
            p = opts[flag]
            takes_value = not getattr(p, "is_flag", False) and "=" not in tok
            i += 2 if takes_value else 1
        else:
            i += 1
    # the command parses for real (types included)
    ctx = cmd.make_context(f"lightmem {name}", list(rest), resilient_parsing=False)
    ctx.close()


def check_lightmem_env(name: str) -> None:
    """A LIGHTMEM_* variable names a Settings field (nested with __) or a CLI option's envvar."""
    if name in cli_envvars():
        return
    assert name.startswith("LIGHTMEM_"), name
    path = name[len("LIGHTMEM_") :].lower().split("__")
    model: Any = Settings
    for part in path:
        fields = model.model_fields
        assert part in fields, f"{name}: {part!r} is not a setting (have {sorted(fields)})"
        model = fields[part].annotation
    # (a leaf: its annotation is a plain type)


def kafka_version() -> str:
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    assert m, "deploy/kafka/pom.xml has no <kafka.version>"
    return m.group(1)


# -- docker compose -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "qdrant", "worker", "sink"} <= set(services)
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version()}"  # the broker the tests use
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:v")
    for name in ("worker", "sink"):
        svc = services[name]
        assert svc["image"] == IMAGE
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_kafka_is_kraft(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "zookeeper" not in COMPOSE.read_text().lower()
    # containers reach kafka:9092; the host reaches the published EXTERNAL listener on loopback only
    assert "INTERNAL://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert compose["services"]["kafka"]["ports"] == ["127.0.0.1:9094:9094"]


def test_compose_ports_and_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no health check"
        assert hc["test"][0] in ("CMD", "CMD-SHELL")
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["qdrant"]["ports"] == ["127.0.0.1:6333:6333"]
    # the worker scales (`--scale worker=3`): no fixed name, no host port
    for name in ("worker", "sink"):
        assert "container_name" not in services[name]
        assert "ports" not in services[name]
    # worker health = faust's status page on the port its command serves
    worker = services["worker"]
    assert "--web-port" in worker["command"]
    port = worker["command"][worker["command"].index("--web-port") + 1]
    assert f"127.0.0.1:{port}" in " ".join(worker["healthcheck"]["test"])
    # sink health = the heartbeat file its command touches
    sink = services["sink"]
    beat = sink["command"][sink["command"].index("--heartbeat-file") + 1]
    assert beat in " ".join(sink["healthcheck"]["test"])


def test_compose_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["worker"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["sink"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["sink"]["depends_on"]["qdrant"]["condition"] == "service_healthy"


def test_compose_commands_are_lightmem_subcommands(compose: dict[str, Any]) -> None:
    for name in ("worker", "sink"):
        check_lightmem_args(compose["services"][name]["command"])
    assert compose["services"]["worker"]["command"][0] == "worker"
    assert compose["services"]["sink"]["command"][0] == "sink"


def test_compose_environment_is_settings(compose: dict[str, Any]) -> None:
    for name in ("worker", "sink"):
        env = compose["services"][name]["environment"]
        assert env["LIGHTMEM_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["LIGHTMEM_STORE__URL"] == "http://qdrant:6333"  # the sink talks to the Qdrant server
        for key in env:
            check_lightmem_env(key)


# -- Dockerfile -----------------------------------------------------------------------------------------
def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and froms[-1].startswith("python:3.11"), froms
    assert re.search(r'^ENTRYPOINT \["lightmem"\]', text, re.M)
    assert re.search(r"^COPY schemas ", text, re.M) and re.search(r"^COPY streams ", text, re.M)
    assert re.search(r"^USER (?!root)", text, re.M), "runs as root"
    assert "HF_HUB_OFFLINE=1" in text


# -- Kubernetes -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    files = sorted(K8S.glob("*.yaml"))
    assert files, "no manifests in deploy/k8s"
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{f.name}: not a manifest"
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_k8s_configmap_is_settings(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    cm = k8s[("ConfigMap", "lightmem-config")]
    for key, value in cm["data"].items():
        check_lightmem_env(key)
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
    assert int(cm["data"]["LIGHTMEM_KAFKA__PARTITIONS"]) >= 1
    assert cm["data"]["LIGHTMEM_STORE__URL"].startswith("http")


def test_k8s_worker_replicas_within_partitions(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    cm = k8s[("ConfigMap", "lightmem-config")]
    worker = k8s[("Deployment", "lightmem-worker")]
    partitions = int(cm["data"]["LIGHTMEM_KAFKA__PARTITIONS"])
    assert 1 <= worker["spec"]["replicas"] <= partitions, "more worker replicas than partitions sit idle"
    header = (K8S / "worker.yaml").read_text().split("apiVersion")[0]
    assert "replicas must stay <= LIGHTMEM_KAFKA__PARTITIONS" in header  # the comment says why
    c = _container(worker)
    check_lightmem_args(c["args"])
    assert c["args"][0] == "worker"
    port = c["args"][c["args"].index("--web-port") + 1]
    assert {p["containerPort"] for p in c["ports"]} == {int(port)}
    assert c["livenessProbe"]["httpGet"]["path"] == "/" and c["readinessProbe"]


def test_k8s_sink_is_single_writer(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    sink = k8s[("Deployment", "lightmem-sink")]
    assert sink["spec"]["replicas"] == 1
    assert sink["spec"]["strategy"]["type"] == "Recreate"  # never two owners of the store at once
    c = _container(sink)
    check_lightmem_args(c["args"])
    assert c["args"][0] == "sink"
    beat = c["args"][c["args"].index("--heartbeat-file") + 1]
    assert beat in " ".join(c["livenessProbe"]["exec"]["command"])


def test_k8s_pods_share_image_and_config(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    for name in ("lightmem-worker", "lightmem-sink"):
        dep = k8s[("Deployment", name)]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        c = _container(dep)
        assert c["image"] == IMAGE
        refs = [e["configMapRef"]["name"] for e in c["envFrom"] if "configMapRef" in e]
        assert refs == ["lightmem-config"]
        assert c["resources"]["requests"]["memory"]


def test_cli_check_rejects_unknown() -> None:
    with pytest.raises(AssertionError):
        check_lightmem_args(["workr"])
    with pytest.raises(AssertionError):
        check_lightmem_args(["worker", "--no-such-option", "1"])
    with pytest.raises(AssertionError):
        check_lightmem_env("LIGHTMEM_KAFKA__NO_SUCH_FIELD")
    assert {"kafka up", "kafka down", "kafka status", "produce", "replay"} <= set(cli_commands())
