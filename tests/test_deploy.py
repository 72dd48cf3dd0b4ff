"""docker-compose.yml and deploy/ stay true to the code: real commands, real settings."""

from __future__ import annotations

import importlib
import json
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

from pumpflow.common.runtime.discovery import installed_services, load_service
from pumpflow.common.runtime.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PUMPFLOW_IMAGES = {
    name: spec
    for name, spec in SERVICES.items()
    if isinstance(spec.get("build"), dict)
    and spec["build"].get("dockerfile") == "deploy/Dockerfile"
}
SERVED = {
    name: spec
    for name, spec in PUMPFLOW_IMAGES.items()
    if spec["command"][:2] == ["pumpflow", "serve"]
}


def env_names(settings_cls: type[CommonSettings]) -> set[str]:
    """Every environment variable a settings class reads (upper case)."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in settings_cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def test_the_distributed_services_are_all_there():
    assert {"feed", "features", "activity"} <= set(SERVED)
    assert {"rabbitmq", "redis", "postgres", "migrate", "prometheus", "grafana"} <= set(SERVICES)
    assert "management" in SERVICES["rabbitmq"]["image"]


@pytest.mark.parametrize("name", sorted(SERVED))
def test_each_service_serves_an_installed_service_with_real_settings(name):
    spec = SERVED[name]
    command = spec["command"]
    assert command == ["pumpflow", "serve", command[2]]
    assert command[2] in installed_services(), f"{name}: {command[2]} is not an installed service"
    assert spec["build"]["args"]["SERVICE"] == command[2]
    service_cls = load_service(command[2])
    known = env_names(service_cls.settings_class)
    unknown = sorted(set(spec["environment"]) - known)
    assert not unknown, f"{name}: not settings of {service_cls.__name__}: {unknown}"


@pytest.mark.parametrize("name", sorted(SERVED))
def test_services_scale(name):
    spec = SERVED[name]
    # replicas need no fixed name and no host port of their own
    assert "container_name" not in spec
    assert "ports" not in spec
    assert "/healthz" in " ".join(spec["healthcheck"]["test"])
    assert spec["environment"]["PUMPFLOW_HTTP_PORT"] == "8000"
    assert spec["environment"]["PUMPFLOW_HTTP_HOST"] == "0.0.0.0"


def test_every_service_uses_the_same_pumpflow_settings():
    shared = {k: v for k, v in SERVED["features"]["environment"].items()}
    for name, spec in SERVED.items():
        for key, value in shared.items():
            assert spec["environment"][key] == value, f"{name}: {key} differs"
    assert SERVICES["migrate"]["environment"] == shared


def test_migrate_runs_the_migrations_with_common_settings():
    spec = SERVICES["migrate"]
    assert spec["command"] == ["pumpflow", "migrate"]
    assert set(spec["environment"]) <= env_names(CommonSettings)
    for name in SERVED:
        assert (
            SERVED[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )


def test_simulator_profile_and_the_feed_url():
    simulator = SERVICES["simulator"]
    assert simulator["profiles"] == ["sim"]
    assert simulator["command"][:2] == ["pumpflow-sim", "serve"]
    scripts = {ep.name for ep in entry_points(group="console_scripts")}
    assert "pumpflow-sim" in scripts, "the simulator package declares no pumpflow-sim script"
    port = simulator["command"][simulator["command"].index("--port") + 1]
    sim_env = dict(
        line.split("=", 1)
        for line in (ROOT / "deploy/sim.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert sim_env["COMPOSE_PROFILES"] == "sim"
    assert sim_env["PUMPPORTAL_WS_URL"] == f"ws://simulator:{port}/api/data"
    assert "${PUMPPORTAL_WS_URL" in SERVICES["feed"]["environment"]["PUMPPORTAL_WS_URL"]


def test_prometheus_scrapes_every_served_service():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "pumpflow")
    scraped = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert scraped == set(SERVED)
    assert job["metrics_path"] == "/metrics"
    assert all(sd["port"] == 8000 for sd in job["dns_sd_configs"])


def test_grafana_is_provisioned_with_a_dashboard_on_real_metrics():
    grafana = SERVICES["grafana"]
    mounts = " ".join(grafana["volumes"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in mounts
    datasources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/pumpflow.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}" in mounts
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/pumpflow.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    # the service picker's query too: a wrong name there leaves every panel empty
    exprs += " ".join(v["definition"] for v in dashboard["templating"]["list"])
    metrics = set(re.findall(r"pumpflow_[a-z_]+", exprs))
    assert {
        "pumpflow_events_consumed_total",
        "pumpflow_handler_seconds_bucket",
        "pumpflow_event_age_seconds_bucket",
        "pumpflow_events_dead_lettered_total",
        "pumpflow_service_info",
    } <= metrics
    # every metric the dashboard plots is one the code exports
    from prometheus_client import REGISTRY

    # importing them registers the bus collector and the service gauges
    importlib.import_module("pumpflow.common.bus.metrics")
    importlib.import_module("pumpflow.common.runtime.http")

    exported = set()
    for family in REGISTRY.collect():
        exported.add(family.name)
        exported.update(
            f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count")
        )
    missing = sorted(m for m in metrics if m not in exported)
    assert not missing, missing


def test_dockerfile_installs_only_the_service_and_the_cli():
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "ARG SERVICE" in dockerfile
    assert 'pip install /app/libs/common "/app/services/${SERVICE}"' in dockerfile
    assert "pip install --no-deps /app" in dockerfile
    assert 'pumpflow serve \\"$SERVICE\\"' in dockerfile
