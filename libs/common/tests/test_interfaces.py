"""The requirements' interfaces, called exactly as the requirements list them."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import EventValidationError, TokenTrade, make_event
from pumpflow.common.interfaces import (
    ActivityAnalyzer,
    Event,
    EventBus,
    EventHistoryManager,
    EventPublisher,
    EventSubscriber,
    FeatureCache,
    FeatureManager,
    TokenMonitorThreadPool,
)
from pumpflow.common.testing import base58_key, eventually
from pumpflow.common.workers import PoolClosed

MINT = "Mint1111111111111111111111111111111111pump"
CURVE_K = 30.0 * 1_073_000_000.0


class Market:
    """PumpPortal frames of one token on a constant-product curve."""

    def __init__(self, mint: str = MINT):
        self.mint = mint
        self.sol = 30.0
        self.n = 0

    def _fields(self, trader: str, sol: float) -> dict:
        self.n += 1
        self.sol += sol
        tokens = CURVE_K / self.sol
        return {
            "signature": base58_key(f"sig{self.mint}{self.n}", 88),
            "mint": self.mint,
            "traderPublicKey": trader,
            "bondingCurveKey": base58_key("Curve"),
            "vTokensInBondingCurve": tokens,
            "vSolInBondingCurve": self.sol,
            "marketCapSol": self.sol / tokens * 1_000_000_000,
            "solAmount": abs(sol),
        }

    def created(self, sol: float = 1.0) -> dict:
        frame = self._fields(base58_key("Creator"), sol)
        bought = 1_073_000_000.0 - frame["vTokensInBondingCurve"]
        return frame | {
            "txType": "create",
            "initialBuy": bought,
            "name": "Test",
            "symbol": "TST",
            "uri": "https://example.invalid/t.json",
        }

    def buy(self, trader: str, sol: float = 0.5) -> dict:
        before = CURVE_K / self.sol
        frame = self._fields(trader, sol)
        bought = before - frame["vTokensInBondingCurve"]
        return frame | {"txType": "buy", "tokenAmount": bought, "newTokenBalance": bought}


class Recorder(EventSubscriber):
    def __init__(self) -> None:
        self.events = []

    async def on_event(self, event) -> None:
        self.events.append(event)


@pytest.fixture
async def bus():
    bus = InMemoryBus(partitions=4)
    await bus.start()
    yield bus
    await bus.close()


async def test_a_published_event_reaches_its_subscribers_until_they_unsubscribe(bus):
    event_bus = EventBus(bus)
    trades, everything = Recorder(), Recorder()
    await event_bus.subscribe("token.trade", trades)
    await event_bus.subscribe("token.*", everything)
    market = Market()
    before = time.time()
    created = Event("token.created", market.created())
    assert created.type == "token.created" and before <= created.time <= time.time()
    await event_bus.publish(created)
    published = await EventPublisher(event_bus).publish_event("token.trade", market.buy("A"))
    assert isinstance(published.data, TokenTrade) and published.key == MINT
    assert await bus.drain(5.0)
    assert trades.events == [published]
    assert everything.events == [created, published]

    await event_bus.unsubscribe("token.trade", trades)
    await EventPublisher(bus).publish_event("token.trade", market.buy("B"))
    assert await bus.drain(5.0)
    assert len(trades.events) == 1
    assert len(everything.events) == 3
    # a later subscriber of the type gets what is published from then on
    late = Recorder()
    await event_bus.subscribe("token.trade", late)
    await event_bus.publish(Event("token.trade", market.buy("C")))
    assert await bus.drain(5.0)
    assert [e.data.traderPublicKey for e in late.events] == ["C"]
    assert len(trades.events) == 1


def test_an_event_is_validated_against_its_type():
    with pytest.raises(EventValidationError):
        Event("token.trade", {"mint": MINT})
    with pytest.raises(EventValidationError):
        Event("no.such.type", {})


async def test_the_feature_cache_returns_what_was_added_and_stays_bounded():
    cache = FeatureCache(2)
    added = await cache.add("m1", 10.0, {"price": 1.5, "trades_per_minute": 3.0})
    assert (await cache.get("m1")).as_dict() == {"price": 1.5, "trades_per_minute": 3.0}
    assert await cache.get("m1") == added
    assert await cache.get("m1", 12.0) == added  # the latest vector is the one as of 12
    assert await cache.get("m1", 9.0) is None  # older features are not kept
    await cache.add("m2", 11.0, {"price": 2.0})
    await cache.add("m3", 12.0, {"price": 3.0})
    assert await cache.get("m1") is None  # evicted: max_size 2
    await cache.clear("m2")
    assert await cache.get("m2") is None
    assert (await cache.get("m3")).time == 12.0
    await cache.clear()
    assert await cache.get("m3") is None


async def test_the_feature_manager_generates_caches_and_publishes_features(bus):
    updates = Recorder()
    event_bus = EventBus(bus)
    await event_bus.subscribe("features.updated", updates)
    clock = ReplayClock(1000.0)
    manager = FeatureManager(event_bus, clock=clock)
    version = manager.register_features(manager.manager.definitions)
    assert version == manager.manager.version

    market = Market()
    created = make_event(
        Event("token.created", market.created()).data, source="feed", time=1000.0, seq=1
    )
    first = await manager.generate_features(MINT, created)
    assert first is not None and first.seq == 1 and first.time == 1000.0
    # raw frames, folded at their timestamp, then generated without new data
    # raw frames are decoded as the feed decodes them: traders are public keys
    alice, bob, carol = (base58_key(name) for name in ("Alice", "Bob", "Carol"))
    assert manager.update_feature_history(MINT, 1010.0, market.buy(alice, 2.0)) is not None
    assert manager.update_feature_history(MINT, 1020.0, market.buy(bob, 1.0)) is not None
    latest = await manager.generate_features(MINT, None)
    assert latest.time == 1020.0
    assert latest.as_dict()["buy_volume_sol_60s"] == pytest.approx(1.0 + 2.0 + 1.0)
    assert await manager.get_cached_features(MINT) == latest

    assert await bus.drain(5.0)
    assert [e.data.values for e in updates.events] == [first.values, latest.values]
    assert [e.seq for e in updates.events] == [1, 2]
    assert updates.events[0].causation_id == created.id
    assert all(e.data.feature_set_version == version for e in updates.events)

    await manager.clear_cache(MINT)
    assert await manager.get_cached_features(MINT) is None
    with pytest.raises(ValueError, match="given for token"):
        manager.update_feature_history("another-mint", 1030.0, market.buy(carol))


async def test_the_monitor_pool_runs_each_token_until_removed_and_replaces_failed_workers():
    calls: dict[str, int] = {"a": 0, "b": 0, "bad": 0}
    loop = asyncio.get_running_loop()
    warmed_up = asyncio.Event()

    def count(token_id: str) -> None:
        calls[token_id] += 1
        if min(calls.values()) >= 3:
            warmed_up.set()

    async def watch(token_id: str) -> None:
        count(token_id)

    def watch_in_a_thread(token_id: str) -> None:
        loop.call_soon_threadsafe(count, token_id)

    async def fail(token_id: str) -> None:
        count(token_id)
        raise RuntimeError("monitor failed")

    pool = TokenMonitorThreadPool(3, interval_s=0.01, registry=CollectorRegistry())
    pool.add_token("a", watch)
    pool.add_token("b", watch_in_a_thread)
    pool.add_token("bad", fail)
    await pool.start_all()
    try:
        await asyncio.wait_for(warmed_up.wait(), 5.0)
        assert pool.remove_token("b")
        # the barrier: a token's tasks run in order, so once a task queued for b now has
        # run, b's run in progress at the removal (its count included) has ended
        await pool.pool.submit("b", lambda: None)
        stopped = calls["b"]
        ran = calls["a"]
        await eventually(lambda: calls["a"] >= ran + 3, within=5, what="3 more runs of a")
        await pool.pool.submit("b", lambda: None)  # b, had it been submitted again, ran
        assert calls["b"] == stopped
        assert calls["a"] > 3 and calls["bad"] > 3  # a failing monitor runs on
        health = pool.monitor_threads()
        assert health.workers == 3 and health.alive == 3
        assert health.restarts >= 3 and health.tasks_failed >= 3
    finally:
        await pool.stop_all()
    # every run has ended and no worker is left to start one: nothing more can happen
    health = pool.pool.health()
    assert (health.alive, health.busy, health.queue_depth) == (0, 0, 0)
    with pytest.raises(PoolClosed):
        pool.pool.submit("a", lambda: None)


async def test_the_activity_analyzer_follows_a_token_through_its_lifecycle(bus):
    lifecycle = Recorder()
    event_bus = EventBus(bus)
    await event_bus.subscribe("token.lifecycle", lifecycle)
    clock = ReplayClock(1000.0)
    analyzer = ActivityAnalyzer(event_bus, clock=clock)
    market = Market()

    async def send(kind: str, frame: dict, at: float) -> None:
        await clock.advance_to(at)
        event = make_event(Event(kind, frame).data, source="feed", time=at)
        await analyzer.update_activity_metrics(MINT, event)

    await send("token.created", market.created(), 1000.0)
    assert analyzer.get_token_lifecycle_state(MINT) == "new"
    assert analyzer.get_activity_level(MINT) < 0.05
    for i in range(20):
        await send("token.trade", market.buy(f"W{i % 6}", 1.0), 1001.0 + 2 * i)
    assert analyzer.get_token_lifecycle_state(MINT) == "active"
    busy = analyzer.get_activity_level(MINT)
    assert busy > 0.2
    change = analyzer.detect_activity_change(MINT)
    assert change is not None and change.kind == "surge"

    await clock.advance(600.0)  # silence: the timers decline it, then retire it
    await analyzer.flush()
    assert analyzer.get_token_lifecycle_state(MINT) == "inactive"
    assert analyzer.get_activity_level(MINT) == 0.0
    assert await bus.drain(5.0)
    states = [e.data.state for e in lifecycle.events if e.data.previous_state != e.data.state]
    assert states == ["new", "active", "declining", "inactive"]
    assert [e.seq for e in lifecycle.events] == list(range(1, len(lifecycle.events) + 1))

    other = Market("Other1111111111111111111111111111111111pump")
    await clock.advance(1.0)
    created = make_event(Event("token.created", other.created()).data, source="feed", time=0)
    await analyzer.update_activity_metrics(other.mint, created)
    migrated = Event("token.migrated", {"signature": "s", "mint": other.mint, "txType": "migrate"})
    await analyzer.update_activity_metrics(other.mint, migrated)
    assert analyzer.get_token_lifecycle_state(other.mint) == "graduated"


def test_the_event_history_answers_by_type_window_recency_and_age():
    clock = ReplayClock(100.0)
    history = EventHistoryManager(clock=clock)
    market, other = Market(), Market("Other1111111111111111111111111111111111pump")
    history.add_event(MINT, "token.created", market.created())
    for t in range(101, 111):
        clock.set_sync(float(t))
        history.add_event(MINT, "token.trade", market.buy(f"W{t}"))
        history.add_event(other.mint, "token.trade", other.buy(f"V{t}"))

    trades = history.get_events(MINT, "token.trade", 103.0, 105.0)
    assert [e.time for e in trades] == [103.0, 104.0, 105.0]
    assert all(e.type == "token.trade" and e.data.mint == MINT for e in trades)
    assert [e.type for e in history.get_events(MINT, "token.created", None, None)] == [
        "token.created"
    ]
    latest = history.get_latest_events(3)
    assert [(e.time, e.data.mint) for e in latest][-1][0] == 110.0
    assert [e.time for e in latest] == [109.0, 110.0, 110.0]
    assert {e.data.mint for e in latest[1:]} == {MINT, other.mint}
    assert len(history.get_latest_events()) == 10

    clock.set_sync(200.0)
    dropped = history.prune_old_events(95)  # keeps events from 105 on
    assert dropped == 5 + 4
    assert history.get_events(MINT, None, None, None)[0].time == 105.0
    history.clear_token_history(MINT)
    assert history.get_events(MINT, None, None, None) == []
    assert history.prune_old_events() == 0  # within the default hour
    assert len(history.get_events(other.mint, "token.trade", None, None)) == 6
