"""Capacity and receipt-to-decision latency of the compose stack, beside the processes'.

The same measure as ``benchmarks/trading_latency.py`` with every service in its
container: ``docker compose --env-file deploy/sim.env up`` under its own project name
(``--project``, default ``pumpflow-bench``), the images built from the project's
Dockerfile, no host ports published (the probes run inside the stack's network, as
``scripts/compose_check.py`` does, whose ``Stack`` this script uses). An override sets
the simulator's seed, launches and speed and trading's entries and limits to the
process benchmark's, so both see the same market and take the same decisions. Grafana
is left out where it has no image. The stack is torn down with its volumes at the end
(``--keep`` leaves it up).

Over the measured window (after ``--warmup`` seconds from every container healthy, for
``--seconds``):

- trade events/s: the feed's counters of frames received (its ``/metrics``) over the
  window;
- receipt to decision: trading's ``pumpflow_receipt_to_decision_seconds``, the growth
  of its buckets over the window (trading's ``/metrics``, every replica summed),
  quantiles interpolated as Prometheus' ``histogram_quantile`` does;
- keeping up: the broker's ready messages over the stack's queues (RabbitMQ's
  ``/metrics/per-object``) on a least-squares line growing by less than 1% of the
  window's token events (and 500); the feed's intake lag (receipt less the frame's time
  on the simulator's market clock) and the receipt-to-decision median, each compared
  between the window's halves or fifths, growing by at most ``--max-growth`` seconds;
  the median over the second half under ``--max-age`` seconds (2, the stale-data
  breaker's default).

Needs the engine (``deploy/engine/setup``) and permission to run ``docker``.

Run: .venv/bin/python benchmarks/compose_latency.py [--launches 30] [--speed 16]
     [--warmup 60] [--seconds 60] [--project pumpflow-bench] [--keep]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import trading_latency as processes

from pumpflow.common.testing import settings_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from compose_check import Stack, wait_for  # noqa: E402

NAMESPACE = "pumpflow"  # the compose file's default namespace and schema


def override(stack: Stack, args: argparse.Namespace) -> str:
    """No host ports; the simulator's market and trading's settings of the process run."""
    config = stack.config()["services"]
    lines = ["services:"]
    for name, spec in config.items():
        if spec.get("ports"):
            lines += [f"  {name}:", "    ports: !reset []"]
    command = [
        "pumpflow-sim", "serve", "--host", "0.0.0.0", "--port", "8765",
        "--seed", str(args.seed), "--rate", f"{args.launches:g}", "--speed", f"{args.speed:g}",
    ]  # fmt: skip
    lines += ["  simulator:", f"    command: {command!r}".replace("'", '"')]
    lines += ["  trading:", "    environment:"]
    lines += [f'      {key}: "{value}"' for key, value in settings_env(**processes.TRADING).items()]
    return "\n".join(lines) + "\n"


def present(stack: Stack) -> list[str]:
    """The services to start: all but those whose image exists nowhere (Grafana here)."""
    config = stack.config()["services"]
    built = {spec.get("image") for spec in config.values() if "build" in spec}
    names = []
    for name, spec in config.items():
        image = spec.get("image")
        if "build" in spec or image in built:
            names.append(name)
        elif os.system(f"docker image inspect {image} >/dev/null 2>&1") == 0:
            names.append(name)
        else:
            print(f"left out: {name} (no image {image})")
    return names


def snapshot(stack: Stack) -> tuple[float, dict[float, float], tuple[float, float, float]]:
    """When, trading's receipt-to-decision buckets (replicas summed), the feed's frames."""
    total: dict[float, float] = {}
    traders = stack.replicas("trading")
    urls = [f"http://{name}:8000/metrics" for name in traders] + ["http://feed:8000/metrics"]
    answers = stack.fetch(urls)
    for status, _ in answers:
        if status != 200:
            raise RuntimeError(f"a service's /metrics answered {status}")
    for _, body in answers[: len(traders)]:
        for bound, count in processes.buckets(body).items():
            total[bound] = total.get(bound, 0.0) + count
    return time.time(), total, processes.feed_frames(answers[-1][1])


def ready_messages(stack: Stack) -> float:
    """Ready messages over the stack's queues, from RabbitMQ's per-queue metrics."""
    [(status, body)] = stack.fetch(["http://rabbitmq:15692/metrics/per-object"])
    if status != 200:
        raise RuntimeError(f"RabbitMQ's /metrics/per-object answered {status}")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("rabbitmq_queue_messages_ready{") and f'queue="{NAMESPACE}.' in line
    )


def recorded(stack: Stack, window: tuple[float, float]) -> list[tuple[str, float, str]]:
    """(signature, receipt, tx type) of every token event the feed received in ``window``."""
    query = (
        f"SELECT signature, event_time, tx_type FROM {NAMESPACE}.token_events "
        f"WHERE event_time >= {window[0]!r} AND event_time < {window[1]!r}"
    )
    out = stack.compose(
        "exec", "-T", "postgres", "psql", "-U", "postgres", "-d", "pumpflow", "-At", "-F", "\t",
        "-c", query,
    )  # fmt: skip
    rows = []
    for line in out.splitlines():
        signature, received, tx_type = line.split("\t")
        rows.append((signature, float(received), tx_type))
    return rows


def measure(stack: Stack, args: argparse.Namespace, services: list[str]) -> None:
    began = time.time()
    stack.compose("up", "-d", "--no-build", *services)
    ok, detail = wait_for(stack.settled, timeout=300)
    if not ok:
        raise RuntimeError(f"the stack did not become healthy: {detail}")
    started = time.time()
    print(f"stack healthy in {started - began:.0f} s; simulator at {args.launches:g} "
          f"launches/min, speed {args.speed:g}", flush=True)  # fmt: skip
    window = (started + args.warmup, started + args.warmup + args.seconds)
    middle = (window[0] + window[1]) / 2
    backlog: list[tuple[float, float]] = []
    loads: list[float] = []
    snapshots: list[tuple[float, dict[float, float], tuple[float, float, float]]] = []
    marks = [window[0], middle, window[1]]
    while len(snapshots) < len(marks):
        time.sleep(args.sample)
        now = time.time()
        depth = ready_messages(stack)
        if window[0] <= now <= window[1]:
            backlog.append((now, depth))
            loads.append(os.getloadavg()[0])
        if now >= marks[len(snapshots)]:
            snapshots.append(snapshot(stack))
        print(f"  {now - started:5.0f} s: ready messages {depth:,.0f}, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    rows = recorded(stack, window)
    span = snapshots[2][0] - snapshots[0][0]
    trades = (snapshots[2][2][0] - snapshots[0][2][0]) / span
    events = (snapshots[2][2][1] - snapshots[0][2][1]) / span
    allowed = max(processes.BACKLOG_FLOOR, processes.BACKLOG_SHARE * len(rows))
    backlog_growth = processes.line_growth(backlog)
    clock = processes.market_times(
        args.seed, args.launches, {s for s, _, _ in rows}, (window[1] - began + 5.0) * args.speed
    )
    intake = processes.growth([(at, at - clock[s] / args.speed) for s, at, _ in rows if s in clock])

    def median(before: dict[float, float], after: dict[float, float]) -> float | None:
        return processes.histogram_quantile(0.5, {b: after[b] - before.get(b, 0.0) for b in after})

    first = median(snapshots[0][1], snapshots[1][1])
    second = median(snapshots[1][1], snapshots[2][1])
    age = None if first is None or second is None else second - first
    reasons = []
    if backlog_growth > allowed:
        reasons.append(f"broker backlog grew by {backlog_growth:,.0f} messages")
    if intake is None or intake > args.max_growth:
        reasons.append(f"feed intake lag grew by {processes._seconds(intake)}")
    if age is None or age > args.max_growth:
        reasons.append(f"receipt-to-decision median grew by {processes._seconds(age)}")
    if second is None or second > args.max_age:
        reasons.append(f"receipt-to-decision median at the end {processes._seconds(second)}")
    loads = loads or [os.getloadavg()[0]]
    print(f"== compose stack (project {args.project}): {args.launches:g} launches/min at speed "
          f"{args.speed:g}, {trades:,.0f} trade events/s ({events:,.0f} token events/s "
          f"received by the feed) over {args.seconds:g} s after {args.warmup:g} s; load "
          f"average {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print(f"the feed's recorder: {len(rows) / args.seconds:,.0f} token events/s of the window "
          f"stored, {snapshots[2][2][2]:,.0f} waiting to be stored")  # fmt: skip
    print(f"backlog on the broker: line grew {backlog_growth:,.0f} messages over the window "
          f"(allowed {allowed:,.0f}); feed intake lag growth {processes._seconds(intake)}, "
          f"receipt-to-decision median growth {processes._seconds(age)} (allowed "
          f"{args.max_growth:g} s)")  # fmt: skip
    print(processes.describe_histogram(snapshots[0][1], snapshots[2][1]))
    print("keeps up" if not reasons else "falls behind: " + "; ".join(reasons))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=float, default=30.0, help="launches a market minute")
    parser.add_argument("--speed", type=float, default=1.0, help="market seconds a wall second")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--sample", type=float, default=3.0, help="seconds between samples")
    parser.add_argument("--max-growth", type=float, default=1.0,
                        help="seconds the intake lag and the median may grow (1)")  # fmt: skip
    parser.add_argument("--max-age", type=float, default=2.0,
                        help="seconds the median may be over the second half (2)")  # fmt: skip
    parser.add_argument("--project", default="pumpflow-bench", help="compose project name")
    parser.add_argument("--env-file", default="deploy/sim.env")
    parser.add_argument("--keep", action="store_true", help="leave the stack up")
    args = parser.parse_args()
    os.chdir(ROOT)
    path = Path(tempfile.mkstemp(prefix="pumpflow-bench-", suffix=".yml")[1])
    path.write_text("{}\n")
    stack = Stack(project=args.project, env_file=args.env_file, override=path)
    try:
        path.write_text(override(stack, args))
        services = present(stack)
        stack.compose("build", *(s for s in services if s != "grafana"), timeout=1800)
        measure(stack, args, services)
    finally:
        if not args.keep:
            stack.compose("down", "-v", "--rmi", "local", timeout=300)
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
