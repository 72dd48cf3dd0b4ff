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

from pumpflow.cli.api import DEFAULT_URL
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


@pytest.mark.parametrize("name", sorted(SERVED))
def test_a_service_ends_its_shutdown_before_compose_kills_it(name):
    """Past stop_grace_period Docker kills the process, unlogged and unclosed."""
    grace = SERVED[name]["stop_grace_period"]
    assert grace.endswith("s") and grace[:-1].isdigit(), grace
    shutdown = CommonSettings.model_fields["shutdown_timeout_s"].default
    assert shutdown < int(grace[:-1])
    assert "PUMPFLOW_SHUTDOWN_TIMEOUT_S" not in SERVED[name]["environment"]


def test_the_readme_controls_the_stack_from_the_services_own_containers():
    """The services publish no host port: the operator's commands run in a container of
    the service they talk to, whose CLI reaches its own replica with its own token."""
    readme = (ROOT / "README.md").read_text()
    calls = set(re.findall(r"docker compose exec ([\w-]+) pumpflow ([\w-]+)", readme))
    assert {("trading", "trading"), ("exit", "stop"), ("exit", "sell")} <= calls, calls
    for service, _ in calls:
        assert service in SERVED, f"{service}: not a service with the CLI installed"
        assert "PUMPFLOW_API_TOKEN" in SERVED[service]["environment"]
        # the CLI's default --url is the replica it runs beside
        assert (
            DEFAULT_URL
            == f"http://127.0.0.1:{SERVED[service]['environment']['PUMPFLOW_HTTP_PORT']}"
        )
    assert "PUMPFLOW_API_TOKEN=" in readme, "how to give the stack its token"


def test_every_service_uses_the_same_pumpflow_settings():
    shared = {k: v for k, v in SERVED["features"]["environment"].items()}
    for name, spec in SERVED.items():
        for key, value in shared.items():
            assert spec["environment"][key] == value, f"{name}: {key} differs"
    assert SERVICES["migrate"]["environment"] == shared


def test_migrate_runs_the_migrations_with_common_settings():
    spec = SERVICES["migrate"]
    assert spec["command"] == ["pumpflow", "migrate"]
    # it runs the feed's image (libs/common and the CLI), with the feed's build: a fresh
    # `up` builds it (or finds it built) and never pulls it from a registry
    assert spec["image"] == SERVICES["feed"]["image"]
    assert spec["build"] == SERVICES["feed"]["build"]
    assert spec.get("pull_policy", "missing") in {"missing", "never", "build"}
    assert SERVICES["feed"]["build"]["args"]["SERVICE"] == "feed"
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


DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
#: the series names of the code: pumpflow's own and the process collector's
CODE_METRIC = re.compile(r"\b(?:pumpflow|process)_[a-z_]+")


def dashboard_metrics(dashboard: dict) -> set[str]:
    """Every pumpflow_* and process_* name a dashboard's queries (panels and variables) use."""
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    # the variables' queries too: a wrong name there leaves every panel empty
    exprs += " ".join(v["definition"] for v in dashboard.get("templating", {}).get("list", []))
    return set(CODE_METRIC.findall(exprs))


def exported_families() -> set[str]:
    """Every metric family the code exports (counters without their _total)."""
    from prometheus_client import REGISTRY, CollectorRegistry

    from pumpflow.activity.metrics import ActivityServiceMetrics
    from pumpflow.common.consumer.metrics import ConsumerMetrics
    from pumpflow.common.workers import TokenMonitorThreadPool
    from pumpflow.exit.metrics import ExitMetrics
    from pumpflow.features.metrics import FeaturesMetrics
    from pumpflow.feed.metrics import FeedMetrics
    from pumpflow.model.metrics import ModelServiceMetrics
    from pumpflow.trading.metrics import TradingMetrics

    # importing them registers the bus collector and the service and partition gauges on
    # the default registry
    for module in (
        "pumpflow.common.bus.metrics",
        "pumpflow.common.bus.ownership",
        "pumpflow.common.runtime.http",
    ):
        importlib.import_module(module)
    # the services', the worker pools' and the keyed consumers' metrics are created per
    # registry (the default one has the process collector: memory, CPU)
    private = CollectorRegistry()
    FeedMetrics(registry=private)
    FeaturesMetrics(registry=private)
    ActivityServiceMetrics(registry=private)
    ModelServiceMetrics(registry=private)
    TradingMetrics(registry=private)
    ExitMetrics(registry=private)
    TokenMonitorThreadPool(registry=private)
    ConsumerMetrics("deploy-check", registry=private)

    return {family.name for registry in (REGISTRY, private) for family in registry.collect()}


SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def exported_metrics() -> set[str]:
    """Every series name the code exports, suffixes of counters and histograms included."""
    return {f"{name}{suffix}" for name in exported_families() for suffix in ("", *SUFFIXES)}


def test_grafana_is_provisioned_with_dashboards():
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
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(f"{path}/")
    assert (ROOT / "deploy/grafana/dashboards" / home.removeprefix(f"{path}/")).is_file()
    names = {p.name for p in DASHBOARDS}
    assert {"pumpflow.json", "pumpflow-market.json"} <= names
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)), uids


def test_the_bus_dashboard_plots_the_bus():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/pumpflow.json").read_text())
    assert {
        "pumpflow_events_consumed_total",
        "pumpflow_handler_seconds_bucket",
        "pumpflow_event_age_seconds_bucket",
        "pumpflow_events_dead_lettered_total",
        "pumpflow_consumer_duplicates_total",
        "pumpflow_consumer_gaps_total",
        "pumpflow_consumer_stalled_commits_total",
        # how far behind the market each keyed consumer's state is
        "pumpflow_consumer_lag_seconds",
        # keys whose events wait for their history to be read
        "pumpflow_consumer_rebuilding_keys",
        "pumpflow_service_info",
        # each consumer's latency from the feed's receipt of the frame
        "pumpflow_receipt_age_seconds_bucket",
        # keyed consumers: keys in memory, their store's trouble, commit and publish time
        "pumpflow_consumer_keys",
        "pumpflow_consumer_store_retries_total",
        "pumpflow_consumer_store_losses_total",
        "pumpflow_consumer_rebuilt_keys_total",
        "pumpflow_consumer_unrecorded_starts_total",
        "pumpflow_consumer_commit_seconds_bucket",
        "pumpflow_consumer_publish_seconds_bucket",
    } <= dashboard_metrics(dashboard)


def test_the_market_dashboard_shows_what_pumpflow_does():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/pumpflow-market.json").read_text())
    assert {
        "pumpflow_feed_frames_total",
        "pumpflow_feed_active_subscriptions",
        "pumpflow_feed_reconnects_total",
        "pumpflow_feed_invalid_frames_total",
        "pumpflow_feed_bytes_received_total",
        # PumpPortal refusing the trade subscriptions (a key not funded)
        "pumpflow_feed_trade_stream_refused",
        # events lost, or not published: failed handling, refused by the store, taken
        # past the lease, stored after a take-over; dead letters dropped
        "pumpflow_feed_frame_errors_total",
        "pumpflow_feed_record_rejected_total",
        "pumpflow_feed_unled_frames_total",
        "pumpflow_feed_superseded_events_total",
        "pumpflow_feed_dead_letters_dropped_total",
        # the store's pace, the socket reader held by it, and the retention
        "pumpflow_feed_record_stage_seconds_bucket",
        "pumpflow_feed_record_reader_wait_seconds_total",
        "pumpflow_feed_pruned_total",
        "pumpflow_activity_tokens",
        "pumpflow_worker_pool_busy_workers",
        "pumpflow_worker_pool_queue_depth",
        "pumpflow_worker_pool_task_seconds_bucket",
        "pumpflow_worker_pool_restarts_total",
        "pumpflow_partitions_owned",
        "pumpflow_partition_rebalances_total",
        "pumpflow_partition_replicas",
    } <= dashboard_metrics(dashboard)


def test_the_trading_dashboard_shows_models_trading_exits_and_processes():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/pumpflow-trading.json").read_text())
    assert {
        # models: predictions by arm, PSI, rolling AUC and precision, refits (and those
        # pruned), labels stored, servings a replica could not serve
        "pumpflow_model_predictions_total",
        "pumpflow_model_feature_psi",
        "pumpflow_model_live_metric",
        "pumpflow_model_refits_total",
        "pumpflow_model_labels_stored_total",
        "pumpflow_model_serving_unavailable_total",
        "pumpflow_model_refits_pruned_total",
        # the serving: its changes, tokens handed to another arm, the arms' shares, the
        # versions served and the feature sets computed
        "pumpflow_model_serving_changes_total",
        "pumpflow_model_tokens_reassigned_total",
        "pumpflow_model_arm_share",
        "pumpflow_model_serving",
        "pumpflow_features_feature_set",
        # vectors not scored, predictions not made, labels dropped unresolved, drift
        # monitors still warming up
        "pumpflow_model_vectors_skipped_total",
        "pumpflow_model_prediction_failures_total",
        "pumpflow_model_dropped_labels",
        "pumpflow_model_drift_warming_up",
        # trading: PnL, positions, exposure, fills, rejections, state, breakers, latency
        "pumpflow_trading_pnl_sol",
        "pumpflow_trading_open_positions",
        "pumpflow_trading_exposure_sol",
        "pumpflow_trading_orders_total",
        "pumpflow_trading_fill_sol_total",
        "pumpflow_trading_fees_sol_total",
        "pumpflow_trading_state",
        # live or paper: nobody takes one for the other
        "pumpflow_trading_executor",
        "pumpflow_trading_breaker_trips_total",
        "pumpflow_receipt_to_decision_seconds_bucket",
        # what an operator must see: a halt not stored, sales in flight and refused,
        # labels the store refused
        "pumpflow_trading_operator_state_stored",
        "pumpflow_trading_sales_in_flight",
        "pumpflow_trading_sales_refused_total",
        "pumpflow_model_labels_refused_total",
        # trades the book does not hold: the wallet and the book differ by them
        "pumpflow_trading_unbooked_trades_total",
        # buys booked past their limit check that left a limit exceeded
        "pumpflow_trading_fills_over_limit_total",
        # exits: progress (tranches without an outcome too), slippage, trading's events
        # the exit's keyed consumer dropped as copies or found a gap before
        "pumpflow_exit_graceful",
        "pumpflow_exit_slippage_bucket",
        # operators' sale requests (pumpflow sell), ordered or refused
        "pumpflow_exit_sale_requests_total",
        "pumpflow_consumer_duplicates_total",
        "pumpflow_consumer_gaps_total",
        # every service's processes
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    } <= dashboard_metrics(dashboard)
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    assert 'outcome="rejected"' in exprs and 'metric="precision"' in exprs
    # refits that decided nothing, by reason
    assert 'outcome=~"refused|failed"' in exprs
    assert 'what="unconfirmed_tranches"' in exprs
    # fills over a limit, by the limit they left exceeded
    assert "sum by (limit) (increase(pumpflow_trading_fills_over_limit_total" in exprs
    assert 'metric!~"auc|precision"' in exprs and 'service="exit"' in exprs


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_plots_only_exported_metrics(path):
    dashboard = json.loads(path.read_text())
    metrics = dashboard_metrics(dashboard)
    assert metrics, f"{path.name} queries no pumpflow metric"
    missing = sorted(metrics - exported_metrics())
    assert not missing, f"{path.name}: not exported by the code: {missing}"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            # counters are plotted as rates, histograms as quantiles over their buckets
            expr = target["expr"]
            for name in CODE_METRIC.findall(expr):
                if name.endswith("_total"):
                    assert "rate(" in expr or "increase(" in expr, expr
                if name.endswith("_bucket"):
                    assert "histogram_quantile(" in expr, expr


#: metrics exported and on no panel nor alert, on purpose: why each is left out
NOT_SHOWN = {
    "pumpflow_consumer_commit_keys": "the batching's shape: its time is shown",
    "pumpflow_consumer_restored_keys": "routine at each rebalance, which is shown",
    "pumpflow_consumer_retired_keys": "routine: tokens going quiet",
    "pumpflow_consumer_timers_fired": "routine: the lifecycle's and the labels' clocks",
    "pumpflow_dependency_waits": "the pauses behind pumpflow_dependency_waiting, shown",
    "pumpflow_feed_dead_letters_pending": "a moment's queue; the letters stored are "
    "pumpflow_events_dead_lettered_total (service feed), the dropped ones are shown",
    "pumpflow_feed_dead_letters_sent": "as pumpflow_events_dead_lettered_total{service=feed}",
    "pumpflow_feed_unsubscribed_trades": "stored, not published, by design",
    "pumpflow_model_batched_rows": "the batching's shape",
    "pumpflow_model_drift_transitions": "the drifting features and ModelDrift show the state",
    "pumpflow_model_drift_window_vectors": "GET /models/{id}/drift tells it",
    "pumpflow_model_live_version": "GET /models/{id}/performance names them",
    "pumpflow_service_start_time_seconds": "a replica's restart: up and ReplicaDown",
}


def test_every_exported_metric_is_shown_or_left_out_on_purpose():
    """A metric added with no panel, no alert and no word here fails: an operator would
    never see it."""
    used = set()
    for path in DASHBOARDS:
        used |= dashboard_metrics(json.loads(path.read_text()))
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        used |= set(CODE_METRIC.findall(rule["expr"]))
    for suffix in SUFFIXES:
        used |= {name.removesuffix(suffix) for name in used}
    ours = {name for name in exported_families() if name.startswith("pumpflow_")}
    unshown = sorted(ours - used - set(NOT_SHOWN))
    assert not unshown, f"exported, on no panel or alert, not in NOT_SHOWN: {unshown}"
    assert not set(NOT_SHOWN) & used, "shown now: take it out of NOT_SHOWN"
    assert set(NOT_SHOWN) <= ours, "not exported any more: take it out of NOT_SHOWN"


def test_the_metric_check_catches_a_wrong_name():
    exported = exported_metrics()
    assert "pumpflow_feed_frames_total" in exported
    bogus = {
        "panels": [
            {"targets": [{"expr": "sum(rate(pumpflow_feed_frame_total[1m]))"}]},
            {"type": "row", "panels": []},
        ],
        "templating": {"list": [{"definition": "label_values(pumpflow_service_infos, service)"}]},
    }
    assert dashboard_metrics(bogus) - exported == {
        "pumpflow_feed_frame_total",
        "pumpflow_service_infos",
    }


def test_alert_rules_use_only_exported_metrics():
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    exprs = " ".join(rule["expr"] for group in groups for rule in group["rules"])
    metrics = set(CODE_METRIC.findall(exprs))
    assert {"pumpflow_feed_connected", "process_resident_memory_bytes"} <= metrics
    missing = sorted(metrics - exported_metrics())
    assert not missing, f"alerts.yml: not exported by the code: {missing}"


def test_the_notifier_runs_on_request_with_real_settings():
    from pumpflow.cli.notify import NotifySettings

    spec = SERVICES["notify"]
    assert spec["profiles"] == ["notify"]
    assert spec["command"] == ["pumpflow", "notify"]
    unknown = sorted(set(spec["environment"]) - env_names(NotifySettings))
    assert not unknown, f"notify: not settings of NotifySettings: {unknown}"
    assert spec["environment"]["PUMPFLOW_NOTIFY_PROMETHEUS_URL"] == "http://prometheus:9090"
    # without a webhook it exits 0, and stays down
    assert spec["restart"] == "on-failure"
    assert spec["healthcheck"] == {"disable": True}


def test_dockerfile_installs_only_the_service_and_the_cli():
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "ARG SERVICE" in dockerfile
    # the service's lock, then the three packages themselves without their dependencies
    assert 'pip install --require-hashes -r "/app/requirements/${SERVICE}.lock"' in dockerfile
    packages = '/app/libs/common "/app/services/${SERVICE}" /app'
    assert f"pip install --no-deps --no-build-isolation {packages}" in dockerfile
    assert 'pumpflow serve \\"$SERVICE\\"' in dockerfile


def test_the_simulator_is_checked_on_its_own_socket_not_the_services_healthz():
    """The image's HEALTHCHECK asks /healthz on 8000, which only services serve."""
    simulator = COMPOSE["services"]["simulator"]
    port = simulator["command"][simulator["command"].index("--port") + 1]
    test = " ".join(simulator["healthcheck"]["test"])
    assert port == "8765" and f", {port})" in test and "8000" not in test


def test_the_feed_waits_for_the_simulator_only_where_it_runs():
    waits = SERVICES["feed"]["depends_on"]
    assert waits["simulator"] == {"condition": "service_healthy", "required": False}
    # and for the infrastructure like every other service
    assert {k: v for k, v in waits.items() if k != "simulator"} == SERVED["features"]["depends_on"]


def test_state_survives_recreated_containers():
    rabbitmq = SERVICES["rabbitmq"]
    # RabbitMQ keeps its data under its node name, rabbit@<hostname>
    assert rabbitmq["hostname"] == "rabbitmq"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in rabbitmq["volumes"]}
    assert mounts["rabbitmq-data"] == "/var/lib/rabbitmq"
    prometheus = SERVICES["prometheus"]
    assert "prometheus-data:/prometheus" in prometheus["volumes"]
    assert "--storage.tsdb.path=/prometheus" in prometheus["command"]
    assert {"rabbitmq-data", "postgres-data", "prometheus-data"} <= set(COMPOSE["volumes"])


def test_prometheus_scrapes_rabbitmq_and_redis():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        j["job_name"]: [t for sc in j.get("static_configs", []) for t in sc["targets"]]
        for j in config["scrape_configs"]
    }
    plugins = (ROOT / "deploy/rabbitmq/enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins and "rabbitmq_management" in plugins
    assert targets["rabbitmq"] == ["rabbitmq:15692"]
    # by queue, so BacklogGrowing leaves the dead-letter queues out (/metrics sums them all)
    rabbitmq = next(j for j in config["scrape_configs"] if j["job_name"] == "rabbitmq")
    assert rabbitmq["metrics_path"] == "/metrics/per-object"
    exporter = SERVICES["redis-exporter"]
    assert exporter["build"]["dockerfile"] == "deploy/redis-exporter.Dockerfile"
    assert targets["redis"] == ["redis-exporter:9121"]


def test_images_run_as_an_unprivileged_user():
    for dockerfile in ROOT.glob("deploy/*Dockerfile"):
        users = re.findall(r"^USER (\S+)", dockerfile.read_text(), re.MULTILINE)
        assert users and users[-1] not in {"root", "0"}, dockerfile.name


#: gauges each replica exports of the whole, not of its share: every model replica serves
#: the same arm table, its rolling window starts from the same stored labels, and each
#: one's drift monitor marks the features it sees drifting; a sum over replicas counts
#: them once per replica
WHOLE_PER_REPLICA = (
    "pumpflow_model_arm_share",
    "pumpflow_model_live_labels",
    "pumpflow_model_live_metric",
    "pumpflow_model_feature_drifting",
    "pumpflow_model_feature_psi",
)
SUMMED = re.compile(r"\bsum\s*(?:by\s*\([^)]*\)\s*)?\(\s*(pumpflow_[a-z_]+)")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_no_dashboard_sums_a_gauge_every_replica_exports_of_the_whole(path):
    dashboard = json.loads(path.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        for target in panel["targets"]:
            summed = set(SUMMED.findall(target["expr"])) & set(WHOLE_PER_REPLICA)
            assert not summed, f"{panel['title']}: sums {summed} over replicas"
