#!/usr/bin/env python3
"""Prove the compose stack: build, run with the simulator, probe, scale, restart, tear down.

    python3 scripts/compose_check.py [--env-file deploy/sim.env] [--project pumpflow-check]
                                     [--timeout 300] [--keep]

Needs a Docker Engine with Compose v2 and the images the compose file names
(deploy/engine/setup provides them where no registry is reachable). Standard library
only, so it runs before any virtualenv exists. It builds the project's images, brings
the stack up under its own project name without host ports (nothing clashes with a
stack already running), and checks: every container healthy; events flowing from the
simulator through feed, features, activity and model to trading's decisions; Prometheus
scraping every replica of every service, RabbitMQ and Redis; `--scale features=3` and
`--scale model=2` (replicas healthy, scraped, the partitions split between them); a
restarted service recovering; every Grafana dashboard query returning data from
Prometheus; `down` then `up` without -v keeping trading's halt (Postgres) and the durable
queues (RabbitMQ). Services whose image exists nowhere (Grafana without a registry) are left
out and reported. Prints a table with timings, tears the stack down with its volumes
and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PIPELINE = ("feed", "features", "activity", "model", "trading", "exit")
SCALED = {"features": 3, "model": 2}
RESTARTED = "activity"
# the halt the check gives before `down` and expects back after `up`
HALT_REASON = "compose-check: kept across down and up"
# what each stage counts when events reach it (summed over its series)
FLOW = {
    "feed": "pumpflow_events_published_total",
    "features": "pumpflow_events_consumed_total",
    "activity": "pumpflow_events_consumed_total",
    "model": "pumpflow_events_consumed_total",
    "trading": "pumpflow_trading_predictions_total",
}
# Grafana's built-in variables, as a dashboard at its default range would expand them
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "5m",
    "__range_s": "300",
}

# Runs inside a project container (it has Python and sits on the stack's network):
# fetches every URL of the JSON list on stdin, prints [[status, body], ...].
FETCH = """
import json, sys, urllib.error, urllib.request
out = []
for url in json.load(sys.stdin):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            out.append([r.status, r.read().decode()])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode()])
    except Exception as e:
        out.append([0, repr(e)])
print(json.dumps(out))
"""


class CheckFailed(Exception):
    """A step failed; the rest of the check cannot run without it."""


@dataclass(kw_only=True)
class Result:
    status: str
    name: str
    seconds: float
    detail: str


@dataclass(kw_only=True)
class Report:
    results: list[Result] = field(default_factory=list)

    def add(self, status: str, name: str, started: float, detail: str = "") -> None:
        result = Result(status=status, name=name, seconds=time.monotonic() - started, detail=detail)
        self.results.append(result)
        print(f"[check] {status:4} {name}: {detail} ({result.seconds:.0f} s)", flush=True)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.results)

    def table(self) -> str:
        width = max(len(r.name) for r in self.results)
        lines = [f"{'RESULT':6} {'CHECK':{width}} {'TIME':>6}  DETAIL"]
        for r in self.results:
            lines.append(f"{r.status:6} {r.name:{width}} {r.seconds:5.0f}s  {r.detail}")
        verdict = "FAIL" if self.failed else "PASS"
        return "\n".join(lines) + f"\ncompose check: {verdict}"


def run(args: list[str], *, stdin: str | None = None, timeout: float = 600) -> str:
    """Run a command, return its stdout; raise CheckFailed with its stderr on failure."""
    done = subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise CheckFailed(f"{' '.join(args[:6])} ... exited {done.returncode}: {tail}")
    return done.stdout


def wait_for(
    condition: Callable[[], tuple[bool, str]], *, timeout: float, every: float = 3
) -> tuple[bool, str]:
    """Poll ``condition`` (ok, detail) until ok or ``timeout``; the last detail."""
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = condition()
        if ok or time.monotonic() >= deadline:
            return ok, detail
        time.sleep(every)


def metric_sum(text: str, name: str) -> float | None:
    """The sum of every sample of ``name`` in a Prometheus text exposition, None if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def dashboard_queries(paths: Iterable[Path]) -> dict[str, list[tuple[str, str]]]:
    """Every panel query of each dashboard, (panel title, PromQL), variables expanded.

    Template variables match everything (``.*``), as the dashboards' "All" does.
    """

    def panels(items: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))  # rows nest their panels

    def expand(expr: str, variables: set[str]) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            if name in GRAFANA_VARIABLES:
                return GRAFANA_VARIABLES[name]
            if name in variables:
                return ".*"
            raise ValueError(f"unknown dashboard variable ${name} in {expr!r}")

        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)

    found: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(paths):
        dashboard = json.loads(path.read_text())
        variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
        queries = found.setdefault(path.name, [])
        for panel in panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                expr = (target.get("expr") or "").strip()
                if expr and not target.get("hide"):
                    queries.append((panel.get("title", "?"), expand(expr, variables)))
    return found


def durable_queues(listing: str) -> set[str]:
    """The durable queues of ``rabbitmqctl list_queues name durable`` (no headers)."""
    rows = (line.split("\t") for line in listing.splitlines() if line.strip())
    return {row[0] for row in rows if row[-1].strip() == "true"}


def halted_for(state: str, reason: str) -> bool:
    """Whether ``pumpflow trading state`` says trading is halted for ``reason``."""
    return state.startswith(f"trading is halted ({reason})")


class Stack:
    """One compose project: the commands and the probes the check needs."""

    def __init__(self, *, project: str, env_file: str, override: Path):
        self.project = project
        self.base = ["docker", "compose", "-p", project, "--env-file", env_file]
        self.base += ["-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]

    def compose(self, *args: str, timeout: float = 600) -> str:
        return run([*self.base, *args], timeout=timeout)

    def config(self) -> dict[str, Any]:
        return json.loads(self.compose("config", "--format", "json"))

    def containers(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "-a", "--format", "json")
        rows: list[dict[str, Any]] = []
        for line in out.splitlines():
            if line.strip():
                value = json.loads(line)
                rows += value if isinstance(value, list) else [value]
        return rows

    def replicas(self, service: str) -> list[str]:
        """Names of the running containers of ``service`` (their names resolve on the network)."""
        return sorted(
            c["Name"]
            for c in self.containers()
            if c["Service"] == service and c["State"] == "running"
        )

    def addresses(self, service: str) -> set[str]:
        names = self.replicas(service)
        if not names:
            return set()
        out = run(
            [
                "docker",
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                *names,
            ]
        )
        return set(out.split())

    def fetch(self, urls: list[str]) -> list[tuple[int, str]]:
        """GET each URL from inside the stack's network (through a trading container)."""
        prober = self.replicas("trading")[0]
        out = run(["docker", "exec", "-i", prober, "python", "-c", FETCH], stdin=json.dumps(urls))
        return [(status, body) for status, body in json.loads(out)]

    def prometheus(self, path: str) -> dict[str, Any]:
        [(status, body)] = self.fetch([f"http://prometheus:9090{path}"])
        if status != 200:
            raise CheckFailed(f"Prometheus {path}: {status} {body[:200]}")
        return json.loads(body)

    def settled(self) -> tuple[bool, str]:
        """Every container healthy, running without a healthcheck, or a one-shot done."""
        waiting, failed = [], []
        for c in self.containers():
            state, health, name = c["State"], c.get("Health") or "", c["Name"]
            if state == "exited" and c.get("ExitCode") == 0 and c["Service"] == "migrate":
                continue
            if state == "running" and health in ("", "healthy"):
                continue
            (failed if state == "exited" or health == "unhealthy" else waiting).append(
                f"{name} {state}/{health or '-'}"
            )
        return not waiting and not failed, ", ".join(failed + waiting) or "all healthy"


class ComposeCheck:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.report = Report()
        self.override = Path(tempfile.mkstemp(prefix="pumpflow-check-", suffix=".yml")[1])
        self.stack = Stack(project=args.project, env_file=args.env_file, override=self.override)
        self.services: list[str] = []

    # ------------------------------------------------------------------ steps

    def prepare(self) -> None:
        """Publish no host ports (the probes run inside); leave out what has no image."""
        started = time.monotonic()
        self.override.write_text("{}\n")
        config = self.stack.config()["services"]
        published = sorted(name for name, spec in config.items() if spec.get("ports"))
        self.override.write_text(
            "services:\n" + "".join(f"  {name}:\n    ports: !reset []\n" for name in published)
        )
        built = {spec.get("image") for spec in config.values() if "build" in spec}
        missing = []
        for name, spec in config.items():
            image = spec.get("image")
            present = (
                "build" in spec
                or image in built
                or subprocess.run(
                    ["docker", "image", "inspect", image], capture_output=True, check=False
                ).returncode
                == 0
            )
            (self.services if present else missing).append(name)
        if missing:
            self.report.add(
                "SKIP",
                "services without an image",
                started,
                f"{', '.join(missing)}: no local image and no registry; their dashboards' "
                "queries are checked against Prometheus below",
            )

    def build(self) -> None:
        started = time.monotonic()
        self.stack.compose("build", timeout=self.args.build_timeout)
        # what this build replaced: untagged images of this project only
        project = f"label=com.docker.compose.project={self.args.project}"
        run(["docker", "image", "prune", "-f", "--filter", project])
        sizes = run(
            ["docker", "images", "--filter", project, "--format", "{{.Repository}} {{.Size}}"]
        )
        ours = sorted(
            f"{repo.removeprefix(self.args.project + '-')} {size}"
            for repo, size in (line.split(" ", 1) for line in sizes.splitlines())
        )
        self.report.add("PASS", "project images build", started, "; ".join(ours))

    def up(self) -> None:
        started = time.monotonic()
        self.stack.compose("up", "-d", "--no-build", *self.services)
        ok, detail = wait_for(self.stack.settled, timeout=self.args.timeout)
        count = len(self.stack.containers())
        self.report.add(
            "PASS" if ok else "FAIL",
            "up: every container healthy",
            started,
            f"{count} containers" if ok else detail,
        )
        if not ok:
            raise CheckFailed("the stack did not become healthy")

    def flow(self) -> None:
        """Each stage's counter grows: events go from the simulator to trading's decisions."""
        started = time.monotonic()
        stages = [s for s in FLOW if s in self.services]

        def counts() -> dict[str, float | None]:
            urls = [f"http://{s}:8000/metrics" for s in stages]
            return {
                stage: metric_sum(body, FLOW[stage]) if status == 200 else None
                for stage, (status, body) in zip(stages, self.stack.fetch(urls), strict=True)
            }

        before = counts()

        def grew() -> tuple[bool, str]:
            now = counts()
            still = [s for s in stages if (now[s] or 0) <= (before[s] or 0)]
            return not still, ", ".join(
                f"{s} {before[s] or 0:.0f}->{now[s] or 0:.0f}" for s in stages
            )

        ok, detail = wait_for(grew, timeout=120)
        self.report.add(
            "PASS" if ok else "FAIL", "events flow simulator -> trading", started, detail
        )
        orders = self.stack.fetch(["http://trading:8000/metrics"])[0][1]
        paper = sum(
            float(line.rsplit(" ", 1)[1])
            for line in orders.splitlines()
            if line.startswith("pumpflow_trading_orders_total{") and 'outcome="filled"' in line
        )
        predictions = metric_sum(orders, "pumpflow_trading_predictions_total") or 0
        self.report.add(
            "INFO",
            "trading decisions",
            started,
            f"{predictions:.0f} predictions decided, {paper:.0f} paper fills",
        )

    def targets(self, name: str) -> None:
        """Prometheus scrapes every replica of every service, RabbitMQ and Redis, all up."""
        started = time.monotonic()

        def scraped() -> tuple[bool, str]:
            active = self.stack.prometheus("/api/v1/targets?state=active")["data"]["activeTargets"]
            up = {
                (t["labels"]["job"], t["labels"]["instance"]) for t in active if t["health"] == "up"
            }
            wrong = []
            for service in PIPELINE:
                if service not in self.services:
                    continue
                want = {a + ":8000" for a in self.stack.addresses(service)}
                have = {i for job, i in up if job == "pumpflow" and i in want}
                if have != want or not want:
                    wrong.append(f"{service} {len(have)}/{len(want)}")
            for job in ("rabbitmq", "rabbitmq-alarms", "redis"):
                if not any(j == job for j, _ in up):
                    wrong.append(f"{job} down")
            down = [
                f"{t['labels']['instance']} {t['lastError']}" for t in active if t["health"] != "up"
            ]
            if wrong:
                return False, "; ".join(wrong + down[:3])
            replicas = ", ".join(
                f"{s} {len(self.stack.replicas(s))}" for s in PIPELINE if s in self.services
            )
            return True, f"{len(up)} targets up ({replicas})"

        # Prometheus finds new replicas at its DNS refresh (15 s), then scrapes (10 s)
        ok, detail = wait_for(scraped, timeout=90)
        self.report.add("PASS" if ok else "FAIL", name, started, detail)

    def rules(self) -> None:
        """Prometheus loaded the alert rules and evaluates them without errors."""
        started = time.monotonic()

        def evaluated() -> tuple[bool, str]:
            groups = self.stack.prometheus("/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            broken = [
                f"{r['name']}: {r.get('lastError', '')}" for r in rules if r["health"] == "err"
            ]
            pending = [r["name"] for r in rules if r["health"] != "ok"]
            firing = sorted({r["name"] for r in rules if r.get("state") == "firing"})
            detail = f"{len(rules)} rules in {len(groups)} groups, firing: {firing or 'none'}"
            if broken:
                return False, "; ".join(broken)
            return bool(rules) and not pending, detail

        ok, detail = wait_for(evaluated, timeout=60)
        self.report.add(
            "PASS" if ok else "FAIL", "Prometheus evaluates the alert rules", started, detail
        )

    def partitions(self, service: str) -> tuple[bool, str]:
        """Every replica of ``service`` owns partitions, none twice, all of them owned."""
        names = self.stack.replicas(service)
        answers = self.stack.fetch([f"http://{n}:8000/readyz" for n in names])
        owned: list[list[int]] = []
        for status, body in answers:
            checks = json.loads(body).get("checks", {}) if body.startswith("{") else {}
            check = checks.get(f"partitions:{service}", {})
            owned.append(check.get("owned", []) if status == 200 else [])
        flat = [p for parts in owned for p in parts]
        total = int(self.stack.config()["services"][service]["environment"]["PUMPFLOW_PARTITIONS"])
        ok = all(owned) and len(flat) == len(set(flat)) == total
        return ok, f"{service} partitions {'/'.join(str(len(p)) for p in owned)} of {total}"

    def scale(self) -> None:
        started = time.monotonic()
        scale = [arg for s, n in SCALED.items() for arg in ("--scale", f"{s}={n}")]
        self.stack.compose("up", "-d", "--no-build", "--no-recreate", *scale, *self.services)
        ok, detail = wait_for(self.stack.settled, timeout=self.args.timeout)
        counts = {s: len(self.stack.replicas(s)) for s in SCALED}
        ok = ok and all(counts[s] == n for s, n in SCALED.items())
        self.report.add(
            "PASS" if ok else "FAIL",
            "scale features=3 model=2: healthy",
            started,
            ", ".join(f"{s} {counts[s]}" for s in SCALED) + ("" if ok else f"; {detail}"),
        )
        if not ok:
            return
        started = time.monotonic()
        for service in SCALED:
            ok, detail = wait_for(lambda s=service: self.partitions(s), timeout=60)
            self.report.add(
                "PASS" if ok else "FAIL",
                f"{service} replicas split the partitions",
                started,
                detail,
            )
        self.targets("Prometheus scrapes the new replicas")

    def restart(self) -> None:
        """A restarted service comes back healthy and consumes again."""
        started = time.monotonic()
        self.stack.compose("restart", RESTARTED)
        ok, detail = wait_for(self.stack.settled, timeout=self.args.timeout)
        if not ok:
            self.report.add("FAIL", f"restart {RESTARTED}", started, detail)
            return

        def consuming() -> tuple[bool, str]:
            counts = []
            for status, body in self.stack.fetch(
                [f"http://{n}:8000/metrics" for n in self.stack.replicas(RESTARTED)]
            ):
                counts.append(metric_sum(body, FLOW[RESTARTED]) if status == 200 else None)
            return all(c for c in counts), f"consumed {counts} since the restart"

        ok, detail = wait_for(consuming, timeout=60)
        self.report.add(
            "PASS" if ok else "FAIL", f"restart {RESTARTED}: healthy, consuming", started, detail
        )

    def persist(self) -> None:
        """`down` then `up` without -v: the halt (Postgres) and durable queues stay."""
        started = time.monotonic()
        trading = ("exec", "-T", "trading", "pumpflow", "trading")
        queues = ("exec", "-T", "rabbitmq", "rabbitmqctl", "-q", "--no-table-headers")
        queues += ("list_queues", "name", "durable")
        self.stack.compose(*trading, "halt", "--reason", HALT_REASON)
        before = durable_queues(self.stack.compose(*queues))
        self.stack.compose("down", timeout=300)
        self.stack.compose("up", "-d", "--no-build", *self.services)
        ok, detail = wait_for(self.stack.settled, timeout=self.args.timeout)
        if not ok:
            self.report.add("FAIL", "down, up: state kept", started, detail)
            return
        state = self.stack.compose(*trading, "state")
        lost = before - durable_queues(self.stack.compose(*queues))
        ok = halted_for(state, HALT_REASON) and not lost
        detail = f"{state.splitlines()[0]}; {len(before) - len(lost)}/{len(before)} durable queues"
        self.report.add("PASS" if ok else "FAIL", "down, up: state kept", started, detail)

    def dashboards(self) -> None:
        """Every panel's query returns data (a zero is data; "No data" is a failure)."""
        from urllib.parse import quote

        for dashboard, queries in dashboard_queries(DASHBOARDS.glob("*.json")).items():
            started = time.monotonic()

            def answered(queries: list[tuple[str, str]] = queries) -> tuple[bool, str]:
                urls = [
                    f"http://prometheus:9090/api/v1/query?query={quote(expr)}"
                    for _, expr in queries
                ]
                empty = []
                for (title, expr), (status, body) in zip(
                    queries, self.stack.fetch(urls), strict=True
                ):
                    answer = json.loads(body) if body.startswith("{") else {}
                    result = answer.get("data", {}).get("result")
                    if status != 200 or not result:
                        empty.append(f"{title!r}: {expr} {answer.get('error', '')}".strip())
                if empty:
                    return False, f"{len(empty)}/{len(queries)} without data: " + " | ".join(empty)
                return True, f"{len(queries)}/{len(queries)} panel queries return data"

            ok, detail = wait_for(answered, timeout=90, every=10)
            self.report.add("PASS" if ok else "FAIL", f"dashboard {dashboard}", started, detail)

    def logs(self) -> None:
        started = time.monotonic()
        ours = [s for s in (*PIPELINE, "migrate", "simulator") if s in self.services]
        text = self.stack.compose("logs", "--no-color", *ours)
        errors = [
            line
            for line in text.splitlines()
            if re.search(r'"level": ?"(ERROR|CRITICAL)"|Traceback', line)
        ]
        kinds: dict[str, int] = {}
        for line in errors:
            container, _, text = line.partition("|")
            message = re.search(r'"message": ?"([^"]{0,160})', text)
            kind = f"{container.strip()}: {message.group(1) if message else text.strip()[:160]}"
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in sorted(kinds.items(), key=lambda item: -item[1]):
            print(f"[check]   {count:4} x {kind}", flush=True)
        self.report.add(
            "PASS" if not errors else "WARN",
            "service logs without errors",
            started,
            f"{len(errors)} error lines of {len(kinds)} kinds (listed above)",
        )

    def teardown(self) -> None:
        if self.args.keep:
            print(f"[check] --keep: project {self.args.project} left running", flush=True)
            return
        started = time.monotonic()
        try:
            self.stack.compose("down", "-v", "--remove-orphans", timeout=300)
            self.report.add("PASS", "down -v", started, "containers, networks, volumes removed")
        except CheckFailed as exc:
            self.report.add("FAIL", "down -v", started, str(exc))

    def main(self) -> int:
        started = time.monotonic()
        try:
            self.prepare()
            self.stack.compose("down", "-v", "--remove-orphans", timeout=300)
            self.build()
            self.up()
            self.flow()
            self.targets("Prometheus scrapes every replica")
            self.rules()
            self.scale()
            self.restart()
            self.dashboards()
            self.logs()
            self.persist()
        except (CheckFailed, subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            # a timeout around the check interrupts it: the stack still goes down
            self.report.add("FAIL", "stopped", started, str(exc) or type(exc).__name__)
            try:
                print(self.stack.compose("ps", "-a"), flush=True)
                print(self.stack.compose("logs", "--no-color", "--tail", "20"), flush=True)
            except CheckFailed:
                pass
        finally:
            self.teardown()
            self.override.unlink(missing_ok=True)
        self.report.add("INFO", "total", started, "")
        print("\n" + self.report.table(), flush=True)
        return 1 if self.report.failed else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", default="deploy/sim.env", help="compose --env-file")
    parser.add_argument("--project", default="pumpflow-check", help="compose project name")
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds for the stack to become healthy"
    )
    parser.add_argument("--build-timeout", type=float, default=1800, help="seconds to build")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    return parser.parse_args(argv)


if __name__ == "__main__":
    os.chdir(ROOT)
    # compose passes it to the services: the check halts trading as an operator would
    os.environ.setdefault("PUMPFLOW_API_TOKEN", secrets.token_hex(16))
    sys.exit(ComposeCheck(parse_args(sys.argv[1:])).main())
