"""The service's deployment files agree with the product: the compose API service, Prometheus and Grafana."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from streams import metrics  # noqa: F401 - registers the lightmem_* series
from tests.test_deploy import IMAGE, check_lightmem_args, check_lightmem_env

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "lightmem.json"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_api_service_is_lightmem_serve(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["image"] == IMAGE and api["command"][0] == "serve" and "--kafka" in api["command"]
    check_lightmem_args(api["command"])
    port = api["command"][api["command"].index("--port") + 1]
    assert api["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(api["healthcheck"]["test"])
    for key in api["environment"]:
        check_lightmem_env(key)
    assert api["environment"]["LIGHTMEM_STORE__URL"] == "http://qdrant:6333"  # replicas read the Qdrant server


def test_prometheus_scrapes_api_workers_and_sink(services: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    api_port = services["api"]["command"][services["api"]["command"].index("--port") + 1]
    assert jobs["lightmem-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    env = services["worker"]["environment"]
    for job, svc, var in (("lightmem-worker", "worker", "WORKER"), ("lightmem-sink", "sink", "SINK")):
        sd = jobs[job]["dns_sd_configs"][0]
        assert sd["names"] == [svc] and str(sd["port"]) == env[f"LIGHTMEM_{var}__METRICS_PORT"]
        assert services[svc]["environment"][f"LIGHTMEM_{var}__METRICS_HOST"] == "0.0.0.0"
    mount = f"./{PROMETHEUS.relative_to(ROOT)}:/etc/prometheus/prometheus.yml:ro"
    assert mount in services["prometheus"]["volumes"]


def test_dashboard_queries_name_exported_series() -> None:
    exported = {m.name for m in REGISTRY.collect()}
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"lightmem_[a-z_]+", target["expr"]))
    assert names
    for name in names:
        base = re.sub(r"_(bucket|total|count|sum)$", "", name)
        assert base in exported, f"{name} is not a series streams.metrics exports"
