"""ActivityService over the in-memory bus, behind the features service: lifecycle events,
timers, feed commands, restart from the store, HTTP."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest

from pumpflow.activity.service import KEY_PREFIX, ActivityService
from pumpflow.common.bus import Subscription
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.consumer import Record
from pumpflow.common.events import Event, decode_event, encode_event
from pumpflow.common.runtime.http import create_app

START = 1_700_000_000.0  # the clock fixture's start


async def stored(svc: ActivityService, mint: str) -> tuple[Record, object]:
    record = msgspec.msgpack.decode(await svc.consumer.store.get(KEY_PREFIX + mint), type=Record)
    return record, svc.processor.decode(record.state)


async def test_lifecycle_events_timers_and_batched_unsubscribes(stack):
    s, tk = stack, stack.tokens
    svc = await s.activity()
    for mint in ("A", "B", "C"):
        await s.send(tk.created(mint))
    await s.pump(["A"], 1, 90)
    for i in range(40):
        await s.at(1 + i)
        await s.send(tk.trade("C", f"g{i}", sol=1.0))
    await s.at(61)
    await s.send(tk.migrated("C"))
    for t in range(70, 400, 10):
        await s.at(t)

    assert s.states("A") == ["new", "active", "declining", "inactive"]
    assert s.states("B") == ["new", "inactive"]
    assert s.states("C") == ["new", "active", "graduated"]
    by_state = {(e.key, e.data.state): e for e in s.lifecycle}
    # timers: quiet since the last trade at 89
    assert by_state[("A", "declining")].time == pytest.approx(START + 89 + 60)
    assert by_state[("A", "inactive")].time == pytest.approx(START + 89 + 180)
    assert by_state[("B", "inactive")].time == pytest.approx(START + 180)
    assert by_state[("A", "active")].data.priority >= 3
    assert by_state[("A", "active")].data.activity_level > 0
    for mint in "ABC":
        assert s.seqs(mint) == list(range(1, len(s.seqs(mint)) + 1))
    assert all(e.source.startswith("activity/") for e in s.lifecycle)
    # retired: out of memory, one batched command for the three of them
    assert len(svc.consumer) == 0
    assert s.commands == []
    assert await svc.flush_subscriptions() == 3
    assert [(c.data.action, sorted(c.data.mints)) for c in s.commands] == [
        ("unsubscribe", ["A", "B", "C"])
    ]
    for mint, state in (("A", "inactive"), ("B", "inactive"), ("C", "graduated")):
        record, token = await stored(svc, mint)
        assert record.retired and token.retired and token.state == state
        assert record.published == len(s.seqs(mint))
    await svc.stop()


async def test_feed_commands_are_batched_and_opposites_cancel_out(stack):
    s = stack
    svc = await s.activity(activity_subscription_batch_max=2)
    svc._request("unsubscribe", "A")
    svc._request("unsubscribe", "B")
    svc._request("unsubscribe", "C")
    svc._request("subscribe", "B")  # B's unsubscribe was not sent yet: both go
    assert await svc.flush_subscriptions() == 2
    assert [(c.data.action, c.data.mints) for c in s.commands] == [("unsubscribe", ("A", "C"))]
    svc._request("subscribe", "D")
    await svc.stop()  # what is pending goes out on stop
    assert [(c.data.action, c.data.mints) for c in s.commands[1:]] == [("subscribe", ("D",))]


class HeldFeedBus(InMemoryBus):
    """Holds each feed command in ``publish`` until released (a broker slow to confirm)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.sent: list[tuple[str, tuple[str, ...]]] = []

    async def publish(self, event: Event) -> None:
        if event.type == "feed.subscription":
            self.holding.set()
            await self.release.wait()
            self.sent.append((event.data.action, event.data.mints))
        await super().publish(event)


async def test_a_token_back_while_its_unsubscribe_is_being_sent_is_subscribed_again(stack):
    bus = HeldFeedBus(partitions=4, synchronous=True, source="test")
    await bus.start()
    svc = await stack.activity(bus=bus)
    svc._request("unsubscribe", "A")
    flushing = asyncio.create_task(svc.flush_subscriptions())
    await bus.holding.wait()
    # A revives while its unsubscribe is on its way: that one cannot be taken back
    svc._request("subscribe", "A")
    bus.release.set()
    await flushing
    await svc.flush_subscriptions()
    assert bus.sent == [("unsubscribe", ("A",)), ("subscribe", ("A",))]
    await svc.stop()
    await bus.close()


async def test_feed_commands_go_out_on_the_clock_every_batch_period(stack):
    # a replay moves the clock by market time: the commands go out at the same market
    # times however little wall time passes
    s, tk = stack, stack.tokens
    await s.activity(activity_subscription_batch_s=50)
    await s.send(tk.created("A"))
    await s.at(179)
    assert s.commands == []
    await s.at(180)  # A turns inactive; the batch that holds it goes out at 200
    assert s.states("A") == ["new", "inactive"] and s.commands == []
    await s.at(199)
    assert s.commands == []
    await s.at(200)
    assert [(c.data.action, c.data.mints, c.time) for c in s.commands] == [
        ("unsubscribe", ("A",), START + 200)
    ]


async def test_a_returning_token_is_resubscribed_but_a_straggler_is_not(stack):
    s, tk = stack, stack.tokens
    svc = await s.activity()
    await s.send(tk.created("A"))
    await s.send(tk.created("B"))
    await s.at(200)
    assert s.states("A") == ["new", "inactive"] and s.states("B") == ["new", "inactive"]
    await svc.flush_subscriptions()
    assert s.commands[-1].data.mints == ("A", "B")
    # A's trades keep coming through another path, at the active pace
    await s.pump(["A"], 210, 240)
    assert s.states("A") == ["new", "inactive", "active"]
    revived = [e for e in s.lifecycle if e.key == "A"][-1]
    assert revived.data.previous_state == "inactive" and "revived" in revived.data.reason
    # one straggler for B: no lifecycle event, retired again
    n = len(s.lifecycle)
    await s.send(tk.trade("B", "x"))
    await s.at(320)
    assert [e for e in s.lifecycle[n:] if e.key == "B"] == []
    assert svc.consumer.state("B") is None
    _, b = await stored(svc, "B")
    assert b.state == "inactive" and b.retired
    await svc.flush_subscriptions()
    assert [(c.data.action, c.data.mints) for c in s.commands[1:]] == [
        ("unsubscribe", ("B",)),
        ("subscribe", ("A",)),
    ]
    await svc.stop()


async def test_a_token_back_after_its_tombstone_expired_numbers_above_its_old_events(stack):
    # exit and trading remember a token's lifecycle seqs longer than its tombstone lasts:
    # seqs given again would be dropped there as duplicates
    s, tk = stack, stack.tokens
    svc = await s.activity()
    await s.send(tk.created("A"))
    await s.at(200)
    assert s.states("A") == ["new", "inactive"]
    before = s.seqs("A")
    # its last write done before the clock jumps an hour, as a running loop does at once
    await svc.consumer.flush()
    await s.at(200 + svc.settings.thresholds().tombstone_ttl_s + 60)
    assert await svc.consumer.store.get(KEY_PREFIX + "A") is None
    await s.pump(["A"], 4000, 4030)
    after = s.seqs("A")[len(before) :]
    assert after and min(after) > max(before)
    assert after == list(range(after[0], after[0] + len(after)))
    await svc.stop()


async def test_a_restarted_replica_carries_on_from_the_store(stack):
    s, tk = stack, stack.tokens
    first = await s.activity()
    await s.send(tk.created("A"))
    await s.send(tk.created("B"))
    await s.pump(["A"], 1, 40)
    assert s.states("A") == ["new", "active"]
    await first.stop()

    second = await s.activity()
    assert second.consumer.state("A").state == "active"
    assert second.consumer.state("B").state == "new"
    assert second.consumer_metrics.counts()["restored"] == 2
    # the broker redelivers an update the first replica had applied: dropped
    last_update: list[Event] = []

    async def keep(event: Event) -> None:
        last_update.append(event)

    await s.bus.subscribe(Subscription(service="tap", patterns=("features.updated",), handler=keep))
    await s.pump(["A"], 42, 50)
    await second.consumer.handle(last_update[0])
    assert second.consumer_metrics.counts()["duplicates"] == 1
    # then A goes quiet: its timers run on the new replica, its seq goes on
    await s.at(50 + 60)
    await s.at(200)
    assert s.states("A") == ["new", "active", "declining"]
    assert s.states("B") == ["new", "inactive"]
    for mint in "AB":
        assert s.seqs(mint) == list(range(1, len(s.seqs(mint)) + 1)), mint
    await second.stop()


async def test_a_replica_restarted_behind_the_market_retires_no_token_whose_trades_are_queued(
    stack,
):
    """Down ten minutes while A trades on: the replica taking over restores A's timer,
    long past on the clock, but A's vectors of those minutes are still queued for it.
    Its lifecycle is judged in the market's time, as the queue drains: A stays active
    and is not unsubscribed."""
    s, tk = stack, stack.tokens
    first = await s.activity()
    await s.send(tk.created("A"))
    await s.pump(["A"], 1, 40)
    assert s.states("A") == ["new", "active"]
    await first.stop()
    queued = []
    for i in range(300):
        await s.at(42 + 2 * i)
        queued.append(s.features.updated(tk.trade("A", f"w{i % 30}", buy=i % 4 != 3)))
    second = await s.activity()
    for vector in queued:
        await s.clock.advance(0.01)  # it drains the backlog fifty times as fast as it came
        await s.bus.publish(vector)
    assert s.states("A") == ["new", "active"]
    assert second.consumer.state("A").state == "active"
    assert await second.flush_subscriptions() == 0
    await second.stop()


async def test_a_token_first_seen_behind_the_market_is_timed_by_its_own_events(stack):
    """400 s of the clock behind the market all along, activity sees a token created and
    trading every 15 s, below the active pace: quiet it never is; it declines once 300 s
    old in the market's time, as an unbroken run on time decides."""
    s, tk = stack, stack.tokens
    svc = await s.activity()
    lag = 400.0
    events = [tk.created("A", time=START)]
    events += [tk.trade("A", f"w{i}", time=START + 15 * i) for i in range(1, 25)]
    for event in events:
        await s.clock.advance_to(event.time + lag)
        await s.send(event)
    assert s.states("A") == ["new", "declining"]
    declined = [e for e in s.lifecycle if e.data.state == "declining"]
    assert declined[0].time == pytest.approx(START + 300, abs=15)
    assert svc.consumer.state("A").state == "declining"
    await svc.stop()


async def test_a_migration_before_the_tokens_first_vector_starts_it_with_nothing_lost(stack):
    # under a backlog the feed's token.migrated (straight to activity) overtakes the
    # token's vectors (a hop through features); activity takes none of the feed's
    # creations and trades, so that seq is far past 1 though no record was lost
    s, tk = stack, stack.tokens
    svc = await s.activity()
    vectors = s.features.of([tk.created("A")] + [tk.trade("A", f"w{i}") for i in range(99)])
    await s.bus.publish(tk.migrated("A"))
    for vector in vectors:
        await s.bus.publish(vector)
    assert s.states("A") == ["graduated"]
    assert svc.consumer_metrics.counts()["unrecorded_starts"] == 0
    record, _ = await stored(svc, "A")
    assert record.applied == {"feed": 101, "features": 100} and record.missing == {}
    await svc.stop()


async def test_a_migration_first_on_an_empty_store_is_announced_at_its_own_time(stack):
    """Nothing applied yet, no time known: a migration (not of activity's market types)
    comes first, a minute behind the clock. Its lifecycle is stamped at the migration's
    time, one the bus carries (JSON has no infinity), not at a time before any."""
    s, tk = stack, stack.tokens
    svc = await s.activity()
    await s.at(100)
    await s.bus.publish(tk.migrated("A", time=START + 40))
    (graduated,) = s.lifecycle
    assert graduated.data.state == "graduated"
    assert graduated.time == START + 40
    assert decode_event(encode_event(graduated)).time == START + 40
    _, token = await stored(svc, "A")
    assert token.since == START + 40
    await svc.stop()


async def test_the_counts_kept_by_state_match_a_recount_of_the_tokens(stack):
    s, tk = stack, stack.tokens
    first = await s.activity()

    def agree(svc: ActivityService) -> dict[str, int]:
        counts = svc.counts()
        assert counts == svc.recount()
        return counts

    agree(first)
    for mint in "ABC":
        await s.send(tk.created(mint))
    assert agree(first)["new"] == 3
    await s.pump(["A"], 1, 40)
    assert agree(first)["active"] == 1
    await s.at(61)
    await s.send(tk.migrated("C"))
    assert agree(first)["graduated"] == 1
    await s.at(200)  # B goes inactive and retires; A declines
    counts = agree(first)
    assert counts["inactive"] == 0 and counts["new"] == 0 and counts["declining"] == 1
    await s.pump(["B"], 210, 240)  # B revived
    held = agree(first)
    assert held["active"] == 1
    await first.stop()
    second = await s.activity()  # restored from the store, no apply yet
    assert agree(second) == held
    await s.at(400)
    agree(second)
    await second.stop()


async def test_http_views(stack):
    s, tk = stack, stack.tokens
    svc = await s.activity()
    await s.send(tk.created("A"))
    await s.send(tk.created("B"))
    await s.pump(["A"], 1, 30)
    app = create_app(svc, s.ctx)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        a = (await client.get("/tokens/A")).json()
        assert a["state"] == "active" and a["priority"] >= 3 and a["activity_level"] > 0
        assert a["metrics"]["unique_traders"] > 3 and not a["retired"]
        assert (await client.get("/tokens/nope")).status_code == 404
        listing = (await client.get("/tokens", params={"state": "active"})).json()
        assert [t["mint"] for t in listing["tokens"]] == ["A"]
        both = (await client.get("/tokens")).json()
        assert [t["mint"] for t in both["tokens"]] == ["A", "B"]  # by priority
        assert both["count"] == 2
        one = (await client.get("/tokens", params={"limit": 1})).json()
        assert one["count"] == 2 and len(one["tokens"]) == 1
        assert (await client.get("/tokens", params={"state": "bogus"})).status_code == 422
        await s.at(400)
        # retired tokens left memory; their stored records say why
        assert (await client.get("/tokens")).json()["count"] == 0
        gone = (await client.get("/tokens/A")).json()
        assert gone["state"] == "inactive" and gone["retired"] and gone["priority"] == 0
        assert gone["retired_at"] == pytest.approx(START + 29 + 180)
    status = await svc.status()
    assert status["keys"] == 0 and status["tokens"]["inactive"] == 0
    assert status["retired"] == 2 and status["pool"]["workers"] == 2
    await svc.stop()


async def test_runs_embedded_behind_the_features_service(clock, tokens):
    from pumpflow.common.runtime.embedded import run_embedded
    from pumpflow.common.testing import eventually
    from pumpflow.features.service import FeaturesService

    seen: list[Event] = []

    async def collect(event: Event) -> None:
        seen.append(event)

    # asynchronous delivery: features consumes the lifecycle events activity publishes
    async with run_embedded([FeaturesService, ActivityService], clock=clock) as system:
        await system.bus.subscribe(
            Subscription(service="probe", patterns=("token.lifecycle",), handler=collect)
        )
        await system.bus.publish(tokens.created("A"))
        await eventually(lambda: [e.data.state for e in seen] == ["new"])
        await clock.advance(181)
        await eventually(lambda: [e.data.state for e in seen] == ["new", "inactive"])
