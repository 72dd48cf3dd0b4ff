"""EventCollector: awaited counts and predicates, clear failures, barriers; on both transports."""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.bus import InMemoryBus, partition_of
from pumpflow.common.events import TokenLifecycle, TokenTrade, make_event
from pumpflow.common.testing import EventCollector, TokenEvents, eventually
from pumpflow.common.testing.plugin import bus_harness_fixture


async def memory_collector(
    *patterns: str, name: str = "probe"
) -> tuple[InMemoryBus, EventCollector]:
    bus = InMemoryBus(partitions=4, source="test/1")
    await bus.start()
    return bus, await EventCollector(name, within=5.0).attach(bus, *patterns)


async def test_wait_for_returns_the_matching_events_once_enough_arrived(token_events):
    bus, probe = await memory_collector("token.*")
    mint = token_events.mint()
    waiting = asyncio.create_task(probe.wait_for(3, "token.trade", key=mint))
    await bus.publish(token_events.created(mint))
    await bus.publish_many([token_events.buy(mint, f"w{i}") for i in range(3)])
    trades = await waiting
    assert [e.seq for e in trades] == [2, 3, 4]
    # what arrived before the call counts; a payload class or a pattern names the type
    assert len(await probe.wait_for(3, TokenTrade)) == 3
    assert len(await probe.wait_for(4, "token.*", key=mint)) == 4
    assert probe.count("token.created") == 1 and len(probe) == 4
    assert list(probe.by_key("token.trade")) == [mint]
    await bus.close()


async def test_a_wait_for_an_event_that_never_comes_fails_naming_what_it_waited_for(
    token_events,
):
    bus, probe = await memory_collector("token.*")
    await bus.publish(token_events.created("m1"))
    with pytest.raises(AssertionError) as failed:
        await probe.wait_for(2, "token.trade", key="m1", within=0.05)
    message = str(failed.value)
    assert "probe: 2 x token.trade key=m1 did not arrive within 0.05 s" in message
    assert "1 recorded {'token.created': 1}" in message
    assert "token.created key=m1 seq=1" in message
    await bus.close()


async def test_wait_until_checks_as_events_arrive_and_returns_the_predicate_value(token_events):
    bus, probe = await memory_collector("token.*")
    mint = token_events.mint()
    waiting = asyncio.create_task(
        probe.wait_until(lambda c: c.count(key=mint) >= 2 and c.of(key=mint)[-1].seq)
    )
    await bus.publish_many([token_events.created(mint), token_events.buy(mint)])
    assert await waiting == 2
    with pytest.raises(AssertionError, match="probe: two sells did not arrive within"):
        await probe.wait_until(lambda c: c.count(key=mint) > 2, within=0.01, what="two sells")
    await bus.close()


async def test_a_failing_predicate_fails_the_wait_with_its_error(token_events):
    bus, probe = await memory_collector("token.*")

    def broken(collector: EventCollector) -> bool:
        if collector.events:
            raise KeyError("no such mint")
        return False

    # tasks start in the order they were made: the wait is registered before the event
    waiting = asyncio.create_task(probe.wait_until(broken))
    await asyncio.create_task(bus.publish(token_events.created()))
    with pytest.raises(KeyError, match="no such mint"):
        await waiting
    await bus.close()


async def test_a_barrier_whose_markers_never_arrive_fails(token_events):
    bus, probe = await memory_collector("token.trade")
    with pytest.raises(AssertionError, match=r"4 of 4 barrier markers \(token.lifecycle\)"):
        await probe.barrier(bus, event_type="token.lifecycle", within=0.05)
    await bus.close()


harness = bus_harness_fixture(partitions=4)


async def test_a_barrier_ends_a_negative_check_on_every_partition(harness, service_name):
    feed = await harness.bus("feed/test")
    probe = await harness.collector("token.lifecycle", name=service_name)
    tokens = TokenEvents()
    mints = [tokens.mint() for _ in range(12)]
    lifecycle = [
        make_event(TokenLifecycle(mint=m, state="active"), source="activity/t", time=1.0, seq=1)
        for m in mints
    ]
    await feed.publish_many(lifecycle)
    await probe.barrier(feed)
    # in partition order: everything published before the markers arrived before them
    assert sorted(e.key for e in probe.events) == sorted(mints)
    assert {partition_of(m, 4) for m in mints} == {0, 1, 2, 3}
    # and markers are not recorded, nor counted by a later barrier
    await probe.barrier(feed, keys=[mints[0]])
    assert len(probe.events) == len(mints)


async def test_events_reach_collectors_of_other_buses_of_the_harness(harness, service_name):
    feed = await harness.bus("feed/test")
    probe = await harness.collector("token.*", name=service_name)
    tokens = TokenEvents()
    mint = tokens.mint()
    await feed.publish_many([tokens.created(mint), tokens.buy(mint), tokens.sell(mint)])
    created, buy, sell = await probe.wait_for(3, key=mint)
    assert [created.seq, buy.seq, sell.seq] == [1, 2, 3]
    assert sell.data.txType == "sell" and sell.data.tokenAmount == buy.data.tokenAmount


async def test_eventually_returns_the_value_and_names_what_failed():
    box: list[int] = []

    async def filled():
        return box[:]

    asyncio.get_running_loop().call_soon(box.append, 7)
    assert await eventually(filled, within=5) == [7]
    with pytest.raises(AssertionError, match=r"the box empty not met within 0.01 s\nbox: "):
        await eventually(
            lambda: not box, within=0.01, what="the box empty", details=lambda: f"box: {box}"
        )


@pytest.fixture
def service_name(namespace) -> str:
    """A consuming service name of this test only, so metric series are its own."""
    return f"probe_{namespace}"
