"""Prometheus' alert rules: valid, loaded, unit-tested by promtool on firing and quiet input.

promtool comes from Debian's ``prometheus`` package (`.ci/run` extracts the binary).
Without it these tests skip, unless ``PUMPFLOW_REQUIRE_TOOLS=1`` (set by CI) makes a
missing tool a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy/prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"


def promtool() -> str:
    """The promtool binary; skip (or fail, where tools are required) when it is missing."""
    found = shutil.which("promtool")
    if found is None:
        reason = (
            "promtool is not installed (Debian's prometheus package: `apt-get download "
            "prometheus && dpkg -x prometheus_*.deb DIR`, then put DIR/usr/bin/promtool on PATH)"
        )
        if os.environ.get("PUMPFLOW_REQUIRE_TOOLS") == "1":
            pytest.fail(f"PUMPFLOW_REQUIRE_TOOLS=1 and {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def run_promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_the_rules_are_valid():
    output = run_promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(alert_names())} rules found" in output


def test_prometheus_loads_the_rules():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    output = run_promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in output
    # compose mounts the rules beside the config, where rule_files finds them
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert (
        "--config.file=/etc/prometheus/prometheus.yml"
        in compose["services"]["prometheus"]["command"]
    )


def test_the_rules_pass_their_unit_tests():
    output = run_promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in output


def test_each_rule_is_tested_firing_and_quiet():
    """promtool checks only what the test file asks: every alert is asked both ways."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alert_names())
    assert names - firing == set(), "never tested firing"
    assert names - quiet == set(), "never tested quiet"
    assert (firing | quiet) <= names, "tests of alerts that do not exist"


def test_the_operator_hears_what_matters():
    assert {
        "FeedDisconnected",
        "BacklogGrowing",
        "BreakerTripped",
        "ModelDrift",
        "ModelServingUnavailable",
        "TradingHalted",
        "ProcessMemoryHigh",
        "ServiceMissing",
        "ServiceDown",
        "DeadLettersGrowing",
        # a key of the wrong kind stalls a service's commits
        "CommitsStalled",
        # Redis, Postgres or RabbitMQ away or frozen, the work it holds waiting
        "DependencyWaiting",
        # RabbitMQ short of memory or disk: every publisher blocked, no queue growing
        "BrokerResourceAlarm",
        # a keyed consumer far behind the market, messages queued: stalled or backlogged
        "ConsumerBehindMarket",
        # Redis lost its contents: what only it held is gone
        "ConsumerStoreLost",
        # the kill switch not durable, tranches that may have sold, labels dropped, the
        # wallet and the book differing
        "TradingHaltNotStored",
        "ExitTranchesUnconfirmed",
        # every exit replica stopped with positions open: their exit rules do not run
        "ExitDownWithPositionsOpen",
        "ModelLabelsRefused",
        "TradesUnbooked",
        # a late fill booked past its limit check, over a limit
        "FillOverLimit",
        # a model's refits refused again and again: it is not refreshed
        "ModelRefitsRefused",
    } <= set(alert_names())
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_a_missing_promtool_fails_where_tools_are_required(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("PUMPFLOW_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="promtool is not installed"):
        promtool()
    monkeypatch.delenv("PUMPFLOW_REQUIRE_TOOLS")
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed"):
        promtool()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) of every panel, variables matching everything."""
    queries = []
    for path in sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = re.sub(r"\$\{?\w+\}?", ".*", target["expr"])
                queries.append((path.name, panel["title"], expr))
    return queries


def test_dashboard_queries_parse_and_their_fallbacks_show_zero(tmp_path):
    """Every panel query is valid PromQL; one with an ``or on () vector(0)`` fallback
    gives 0 on a system with no series at all, so a quiet panel reads 0, not No data."""
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboards", "rules": []}]}
    cases = []
    for index, (_, _, expr) in enumerate(queries):
        rules["groups"][0]["rules"].append({"record": f"dashboard:query_{index}", "expr": expr})
        if re.search(r"or on ?\(\) vector\(0\)\s*$", expr):
            cases.append(
                {"expr": expr, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": 0}]}
            )
    assert len(cases) > 30
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    output = run_promtool("check", "rules", str(tmp_path / "queries.yml"))
    assert f"SUCCESS: {len(queries)} rules found" in output
    tests = {
        "rule_files": [],
        "tests": [{"interval": "1m", "input_series": [], "promql_expr_test": cases}],
    }
    (tmp_path / "empty.test.yml").write_text(yaml.safe_dump(tests))
    run_promtool("test", "rules", str(tmp_path / "empty.test.yml"))


def test_the_models_trading_and_exits_dashboard_never_reads_no_data():
    for name, title, expr in dashboard_queries():
        if name == "pumpflow-trading.json":
            assert re.search(r"or on \(\) vector\(0\)$", expr), f"{title}: {expr}"


def panel_target(dashboard: str, title: str) -> tuple[dict, str]:
    """The panel titled ``title`` and its first query, variables matching everything."""
    found = next(
        p
        for p in json.loads((ROOT / "deploy/grafana/dashboards" / dashboard).read_text())["panels"]
        if p["title"] == title
    )
    return found, re.sub(r"\$\{?\w+\}?", ".*", found["targets"][0]["expr"])


def evaluates_to(
    tmp_path: Path, expr: str, series: list[dict], samples: list[dict], at: str = "1m"
) -> bool:
    """Whether ``expr`` gives exactly ``samples`` at ``at`` over ``series`` (by promtool)."""
    tests = {
        "rule_files": [],
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [{"expr": expr, "eval_time": at, "exp_samples": samples}],
            }
        ],
    }
    path = tmp_path / "panel.test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    return result.returncode == 0


def test_the_dead_letters_panel_counts_a_replicas_first_letters(tmp_path):
    """The bus exports a (service, type, lane) dead-letter series from its first letter,
    already above 0: increase() alone would read 0 for them."""
    _, expr = panel_target("pumpflow.json", "Dead letters per service (per 5 min)")
    # two letters at 1m, the replica's first of that type and lane
    first = [
        {
            "series": 'pumpflow_events_dead_lettered_total{service="model", type="unknown", '
            'lane="partition", instance="m1:8000"}',
            "values": "_ 2",
        }
    ]
    assert evaluates_to(tmp_path, expr, first, [{"labels": '{service="model"}', "value": 2}])
    # three more at 6m: the series was there before, its increase counts
    more = [{**first[0], "values": "_ 2x4 5"}]
    assert evaluates_to(tmp_path, expr, more, [{"labels": '{service="model"}', "value": 3}], "6m")


def test_the_prediction_failures_panel_counts_a_models_first_failures(tmp_path):
    """A (model, error) series appears at its first failure, already above 0: increase()
    alone would read 0 for a model that fails from then on."""
    _, expr = panel_target(
        "pumpflow-trading.json",
        "Predictions a model could not make (per 5 min), by model and error",
    )
    labels = 'model_id="entry", error="ModelError"'
    first = [
        {
            "series": f'pumpflow_model_prediction_failures_total{{{labels}, instance="m1:8000"}}',
            "values": "_ 4",
        }
    ]
    assert evaluates_to(tmp_path, expr, first, [{"labels": f"{{{labels}}}", "value": 4}])
    more = [{**first[0], "values": "_ 4x4 10"}]
    assert evaluates_to(tmp_path, expr, more, [{"labels": f"{{{labels}}}", "value": 6}], "6m")
    assert evaluates_to(tmp_path, expr, [], [{"labels": "{}", "value": 0}])


def test_the_trading_state_stat_says_when_no_replica_trades(tmp_path):
    """The stat maps its value to a text: a system where no replica holds the lease (or
    none is scraped) must not read "active"."""
    stat, expr = panel_target("pumpflow-trading.json", "Trading state")
    texts = {
        float(value): shown["text"]
        for mapping in stat["fieldConfig"]["defaults"]["mappings"]
        for value, shown in mapping["options"].items()
    }

    def shown(series: list[dict]) -> str:
        for value, text in texts.items():
            if evaluates_to(tmp_path, expr, series, [{"labels": "{}", "value": value}]):
                return text
        return "unmapped"

    def replica(instance: str, leads: int, state: str) -> list[dict]:
        labels = f'instance="{instance}"'
        return [
            {"series": f"pumpflow_trading_leader{{{labels}}}", "values": f"{leads} {leads}"},
            *(
                {
                    "series": f'pumpflow_trading_state{{state="{each}", {labels}}}',
                    "values": "1 1" if each == state else "0 0",
                }
                for each in ("active", "reducing", "halted")
            ),
        ]

    assert shown(replica("t1:8000", 1, "active") + replica("t2:8000", 0, "halted")) == "active"
    assert shown(replica("t1:8000", 1, "reducing")) == "reducing"
    assert shown(replica("t1:8000", 0, "active") + replica("t2:8000", 1, "halted")) == "halted"
    # the lease lost by every replica: their gauges are as they stood by
    assert shown(replica("t1:8000", 0, "active") + replica("t2:8000", 0, "active")) == (
        "no replica trades"
    )
    assert shown([]) == "no replica trades"
