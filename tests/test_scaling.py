"""Two replicas of the features service share the partitions, as separate processes.

The simulator serves PumpPortal's protocol, the feed publishes token events over
RabbitMQ, and two ``pumpflow serve features`` processes split the partitions
between them (rendezvous over their heartbeats in Redis). A checker in this process
consumes the feed's token events and every ``features.updated``: each token gets
features, and each mint's seq runs on without a hole, also across a hand-over when
one replica stops.
"""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.bus import partition_of
from pumpflow.common.bus.ownership import assign_partitions
from pumpflow.common.testing import EventCollector, eventually, free_port, http_get, http_json

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

PARTITIONS = 8
REPLICAS = ("features-a", "features-b")
UPDATED = "features.updated"


def _owned(port: int) -> set[int] | None:
    """Partitions the replica behind ``port`` reports on /readyz (None: not ready)."""
    body = http_json(f"http://127.0.0.1:{port}/readyz")
    if not body or not body.get("ready"):
        return None
    return set(body["checks"]["partitions:features"]["owned"])


def _consumed_trades(port: int) -> float:
    _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pumpflow_events_consumed_total{")
        and 'service="features"' in line
        and 'type="token.trade"' in line
    )


def _caught_up(checker: EventCollector) -> bool:
    """Every token's features include the last of its events the checker got from the feed."""
    fed: dict[str, int] = {}
    for event in checker.of("token.created") + checker.of("token.trade"):
        fed[event.key] = max(fed.get(event.key, 0), event.seq)
    included: dict[str, int] = {}
    for event in checker.of(UPDATED):
        included[event.key] = max(included.get(event.key, 0), event.data.source_seq)
    return all(included.get(mint, 0) >= seq for mint, seq in fed.items())


async def test_two_features_replicas_split_partitions_and_hand_over(
    process_stack, rabbitmq_harness, namespace, redis_client
):
    stack = process_stack
    sim_port = free_port()
    ports = {replica: free_port() for replica in REPLICAS}
    stack.configure(
        partitions=PARTITIONS,
        heartbeat_interval_s=0.3,
        # generous: a replica stalled by a loaded machine must not be taken for dead
        heartbeat_ttl_s=3.0,
        feed_record=False,
        PUMPPORTAL_WS_URL=f"ws://127.0.0.1:{sim_port}/api/data",
    )
    bus = await rabbitmq_harness.bus("check/1", partitions=PARTITIONS)
    # declared before anything is published, so the checker misses nothing
    checker = await EventCollector("checker", within=60).attach(
        bus, UPDATED, "token.created", "token.trade"
    )

    def http(check):
        """A check over the replicas' HTTP endpoints, polled off the event loop."""
        return lambda: asyncio.to_thread(check)

    def by_mint() -> dict:
        return checker.by_key(UPDATED)

    for replica in REPLICAS:
        stack.serve("features", name=replica, replica=replica, http_port=ports[replica])
    # both replicas are ready and own disjoint halves that cover every partition
    expected = assign_partitions(PARTITIONS, REPLICAS)

    def split() -> bool:
        owned = [_owned(ports[r]) for r in REPLICAS]
        return owned == [set(expected[r]) for r in REPLICAS]

    await eventually(
        http(split), 60, what="the replicas to split the partitions", details=stack.logs,
        interval=0.2,
    )  # fmt: skip
    assert all(expected[r] for r in REPLICAS)

    # the market opens once the replicas have settled
    stack.pumpflow(
        "simulator", "sim", "serve", "--port", str(sim_port), "--speed", "10",
        "--seed", "7", "--rate", "120",
    )  # fmt: skip
    stack.serve("feed", http_port=0)

    # both do work, on their own partitions only
    await checker.wait_for(51, UPDATED)
    await eventually(
        http(lambda: all(_consumed_trades(ports[r]) > 0 for r in REPLICAS)),
        60,
        what="both replicas to compute features",
        details=stack.logs,
        interval=0.2,
    )
    for mint, updates in by_mint().items():
        owner = next(r for r in REPLICAS if partition_of(mint, PARTITIONS) in expected[r])
        assert {e.source for e in updates} == {f"features/{owner}"}, f"{mint}\n{stack.logs()}"

    # enough of b's tokens are trading that some will trade on after the hand-over
    def in_b(mint: str) -> bool:
        return partition_of(mint, PARTITIONS) in expected["features-b"]

    await checker.wait_until(
        lambda c: sum(map(in_b, c.by_key(UPDATED))) >= 12, what="12 tokens in b's partitions"
    )

    # one replica stops (SIGTERM): it leaves, the other takes its partitions over
    before = {mint: len(updates) for mint, updates in by_mint().items()}
    assert await stack.stop("features-b") == 0, stack.logs()
    await eventually(
        http(lambda: _owned(ports["features-a"]) == set(range(PARTITIONS))),
        15,
        what="the survivor to own every partition",
        details=stack.logs,
        interval=0.2,
    )
    taken_over = {mint for mint in before if in_b(mint)}
    await checker.wait_until(
        lambda c: sum(c.count(UPDATED, key=m) > before[m] for m in taken_over) >= 3,
        what="tokens of the stopped replica to move on",
    )

    # the feed stops: once the checker got all it published and features of all of it
    # arrived, check every token
    assert await stack.stop("feed") == 0, stack.logs()
    # per partition in order: behind these markers is everything the feed published
    await checker.barrier(bus, event_type=UPDATED)
    await checker.wait_until(_caught_up, what="features of every event the feed published")
    created = {e.key for e in checker.of("token.created")}
    assert created, stack.logs()
    updates = by_mint()
    missing = created - set(updates)
    assert not missing, f"no features for {sorted(missing)[:5]}"
    for mint, events in updates.items():
        # per-mint seq goes on without a hole (a redelivered copy is dropped by seq)
        seqs = [e.seq for e in events]
        assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), f"{mint} {seqs}"
    moved = [m for m in taken_over if len({e.source for e in updates[m]}) == 2]
    assert moved, "no token was updated by both replicas"

    assert await stack.stop("features-a") == 0, stack.logs()
    assert await redis_client.keys(f"{namespace}:replicas:*") == []
