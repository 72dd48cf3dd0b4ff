"""Two replicas of the features service share the partitions, as separate processes.

The simulator serves PumpPortal's protocol, the feed publishes token events over
RabbitMQ, and two ``pumpflow serve features`` processes split the partitions
between them (rendezvous over their heartbeats in Redis). A checker in this process
consumes every ``features.updated``: each token gets features, and each mint's seq
runs on without a hole, also across a hand-over when one replica stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from pumpflow.common.bus import Subscription, partition_of
from pumpflow.common.bus.ownership import assign_partitions
from pumpflow.common.events import Event
from pumpflow.common.testing import free_port

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

BIN = Path(sys.executable).parent
PARTITIONS = 8
REPLICAS = ("features-a", "features-b")


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"null")
    except (OSError, ValueError):
        return None


def _owned(port: int) -> set[int] | None:
    """Partitions the replica behind ``port`` reports on /readyz (None: not ready)."""
    body = _get_json(f"http://127.0.0.1:{port}/readyz")
    if not body or not body.get("ready"):
        return None
    return set(body["checks"]["partitions:features"]["owned"])


def _consumed_trades(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pumpflow_events_consumed_total{")
        and 'service="features"' in line
        and 'type="token.trade"' in line
    )


async def _until(check, within: float, what: str, logs=lambda: ""):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


class Checker:
    """Records every features.updated and token.created it is delivered."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = defaultdict(list)
        self.sources: dict[str, set[str]] = defaultdict(set)
        self.created: set[str] = set()

    async def __call__(self, event: Event) -> None:
        if event.type == "token.created":
            self.created.add(event.key)
        else:
            self.seqs[event.key].append(event.seq)
            self.sources[event.key].add(event.source)

    @property
    def updates(self) -> int:
        return sum(len(s) for s in self.seqs.values())


async def test_two_features_replicas_split_partitions_and_hand_over(
    tmp_path, namespace, amqp_url, redis_url, redis_client
):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    sim_port = free_port()
    ports = {replica: free_port() for replica in REPLICAS}
    env = {
        **os.environ,
        "PUMPFLOW_TRANSPORT": "rabbitmq",
        "PUMPFLOW_NAMESPACE": namespace,
        "PUMPFLOW_PARTITIONS": str(PARTITIONS),
        "PUMPFLOW_AMQP_URL": amqp_url,
        "PUMPFLOW_REDIS_URL": redis_url,
        "PUMPFLOW_LOG_FORMAT": "text",
        "PUMPFLOW_HEARTBEAT_INTERVAL_S": "0.3",
        # generous: a replica stalled by a loaded machine must not be taken for dead
        "PUMPFLOW_HEARTBEAT_TTL_S": "3.0",
        "PUMPFLOW_FEED_RECORD": "false",
        "PUMPPORTAL_WS_URL": f"ws://127.0.0.1:{sim_port}/api/data",
    }
    checker = Checker()
    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=PARTITIONS, source="check/1")
    await bus.start()
    # declared before anything is published, so the checker misses nothing
    await bus.subscribe(
        Subscription(
            service="checker", patterns=("features.updated", "token.created"), handler=checker
        )
    )
    procs: dict[str, subprocess.Popen] = {}
    logfiles = {}

    def start(name: str, args: list[str], extra: dict[str, str]) -> None:
        logfiles[name] = open(tmp_path / f"{name}.log", "w")
        procs[name] = subprocess.Popen(
            args, env={**env, **extra}, stdout=logfiles[name], stderr=subprocess.STDOUT
        )

    def logs() -> str:
        for f in logfiles.values():
            f.flush()
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log"))
        )

    try:
        for replica in REPLICAS:
            start(
                replica,
                [BIN / "pumpflow", "serve", "features"],
                {"PUMPFLOW_REPLICA": replica, "PUMPFLOW_HTTP_PORT": str(ports[replica])},
            )
        # both replicas are ready and own disjoint halves that cover every partition
        expected = assign_partitions(PARTITIONS, REPLICAS)

        def split() -> bool:
            owned = [_owned(ports[r]) for r in REPLICAS]
            return owned == [set(expected[r]) for r in REPLICAS]

        await _until(split, 60, "the replicas to split the partitions", logs)
        assert all(expected[r] for r in REPLICAS)

        # the market opens once the replicas have settled
        start(
            "simulator",
            [BIN / "pumpflow", "sim", "serve", "--port", str(sim_port), "--speed", "10",
             "--seed", "7", "--rate", "120"],
            {},
        )  # fmt: skip
        start("feed", [BIN / "pumpflow", "serve", "feed"], {"PUMPFLOW_HTTP_PORT": "0"})

        # both do work, on their own partitions only
        await _until(
            lambda: all(_consumed_trades(ports[r]) > 0 for r in REPLICAS) and checker.updates > 50,
            60,
            "both replicas to compute features",
            logs,
        )
        for mint, sources in checker.sources.items():
            owner = next(r for r in REPLICAS if partition_of(mint, PARTITIONS) in expected[r])
            assert sources == {f"features/{owner}"}, f"{mint}\n{logs()}"

        # enough of b's tokens are trading that some will trade on after the hand-over
        def b_tokens() -> int:
            return sum(
                partition_of(mint, PARTITIONS) in expected["features-b"] for mint in checker.seqs
            )

        await _until(lambda: b_tokens() >= 12, 60, "tokens in the partitions of b", logs)

        # one replica stops (SIGTERM): it leaves, the other takes its partitions over
        before = {mint: len(seqs) for mint, seqs in checker.seqs.items()}
        procs["features-b"].send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(procs["features-b"].wait, 60)
        assert code == 0, logs()
        await _until(
            lambda: _owned(ports["features-a"]) == set(range(PARTITIONS)),
            15,
            "the survivor to own every partition",
            logs,
        )
        taken_over = {
            mint for mint in before if partition_of(mint, PARTITIONS) in expected["features-b"]
        }

        def carried_on() -> bool:
            return sum(len(checker.seqs[m]) > before[m] for m in taken_over) >= 3

        await _until(carried_on, 60, "tokens of the stopped replica to move on", logs)

        # the feed stops; once everything published is handled, check every token
        procs["feed"].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(procs["feed"].wait, 60) == 0, logs()
        last = -1
        while checker.updates != last:
            last = checker.updates
            await asyncio.sleep(1.5)
        assert checker.created, logs()
        missing = checker.created - set(checker.seqs)
        assert not missing, f"no features for {sorted(missing)[:5]}"
        for mint, seqs in checker.seqs.items():
            # per-mint seq goes on without a hole (a redelivered copy is dropped by seq)
            assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), f"{mint} {seqs}\n{logs()}"
        moved = [m for m in taken_over if len(checker.sources[m]) == 2]
        assert moved, "no token was updated by both replicas"

        procs["features-a"].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(procs["features-a"].wait, 60) == 0, logs()
        assert await redis_client.keys(f"{namespace}:replicas:*") == []
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for f in logfiles.values():
            f.close()
        with contextlib.suppress(Exception):
            await bus.delete_topology(services=["features", "feed", "checker"])
        await bus.close()
