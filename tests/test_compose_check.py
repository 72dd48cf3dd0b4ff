"""The container check and the local engine's recipes cover what the compose file names."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "deploy/engine/images"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# Grafana has no Debian package to build it from: the check leaves it out and checks
# its dashboards' queries against Prometheus instead
NO_RECIPE = {"grafana"}


@functools.cache
def load_check():
    """scripts/compose_check.py as a module (a script, not an installed package)."""
    spec = importlib.util.spec_from_file_location(
        "compose_check", ROOT / "scripts/compose_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up while the script defines them
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def registry_images() -> set[str]:
    """Images pulled by name: compose services without a build, FROMs of deploy/'s Dockerfiles."""
    services = COMPOSE["services"].values()
    built = {s.get("image") for s in services if "build" in s}
    names = {s["image"] for s in services if "build" not in s}
    dockerfiles = [ROOT / "deploy/Dockerfile", *(ROOT / "deploy").glob("*.Dockerfile")]
    for path in dockerfiles:
        names |= set(re.findall(r"^FROM\s+(\S+)", path.read_text(), re.MULTILINE))
    return names - built


@pytest.mark.parametrize("image", sorted(registry_images()))
def test_every_registry_image_has_a_local_recipe(image):
    name = image.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    if name in NO_RECIPE:
        pytest.skip(f"{image}: no local recipe, left out of the check")
    dockerfile = RECIPES / name / "Dockerfile"
    assert dockerfile.is_file(), f"{image}: no {dockerfile.relative_to(ROOT)}"
    assert dockerfile.read_text().count("FROM pumpflow-engine/bookworm:base") == 1


@pytest.mark.parametrize("name", ["postgres", "prometheus", "rabbitmq", "redis"])
def test_servers_built_locally_run_unprivileged(name):
    users = re.findall(r"^USER\s+(\S+)", (RECIPES / name / "Dockerfile").read_text(), re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}


def test_every_dashboard_panel_query_is_checked():
    check = load_check()
    dashboards = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    queries = check.dashboard_queries(dashboards)
    assert set(queries) == {p.name for p in dashboards}
    for path in dashboards:
        panels = json.loads(path.read_text())["panels"]
        panels += [nested for row in panels for nested in row.get("panels", [])]
        with_targets = [p for p in panels if any(t.get("expr") for t in p.get("targets", []))]
        assert {title for title, _ in queries[path.name]} == {p["title"] for p in with_targets}
        for _, expr in queries[path.name]:
            assert "$" not in expr, f"{path.name}: a variable left in {expr}"


def test_dashboard_variables_are_expanded_and_unknown_ones_named(tmp_path):
    check = load_check()
    target = {"expr": 'rate(x{service=~"$service"}[$__rate_interval])'}
    dashboard = {
        "templating": {"list": [{"name": "service"}]},
        "panels": [
            {
                "title": "a row",
                "panels": [{"title": "p", "targets": [target, {"expr": "y", "hide": True}]}],
            }
        ],
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dashboard))
    assert check.dashboard_queries([path]) == {"d.json": [("p", 'rate(x{service=~".*"}[1m])')]}
    target["expr"] = 'x{a="$nope"}'
    path.write_text(json.dumps(dashboard))
    with pytest.raises(ValueError, match=r"\$nope"):
        check.dashboard_queries([path])


def test_metric_sum_adds_every_series_of_a_name_only():
    check = load_check()
    text = (
        "# HELP pumpflow_events_consumed_total x\n"
        'pumpflow_events_consumed_total{type="a"} 2.0\n'
        'pumpflow_events_consumed_total{type="b"} 3.0\n'
        "pumpflow_events_consumed_totally 7.0\n"
    )
    assert check.metric_sum(text, "pumpflow_events_consumed_total") == 5.0
    assert check.metric_sum(text, "pumpflow_missing_total") is None


def test_durable_queues_are_named_from_rabbitmqctl_and_transient_ones_left_out():
    check = load_check()
    listing = "pumpflow.features.p0\ttrue\npumpflow.reply.abc\tfalse\n\npumpflow.dlq\ttrue\n"

    assert check.durable_queues(listing) == {"pumpflow.features.p0", "pumpflow.dlq"}


def test_trading_state_names_the_halt_reason_only_when_halted():
    check = load_check()

    assert check.halted_for("trading is halted (compose-check); role active\n", "compose-check")
    assert not check.halted_for("trading is active (resume (CLI)); role active\n", "compose-check")
    assert not check.halted_for("trading is halted (other); role active\n", "compose-check")
