"""The consume-side logic both transports share."""

from __future__ import annotations

import asyncio
import time

import pytest

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.dispatch import Dispatcher, hold, release
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.metrics import AGE_BUCKETS, Histogram, series
from pumpflow.common.events import TokenCreated, TokenMigrated, make_event


def migrated(seq: int):
    return make_event(
        TokenMigrated(signature=f"s{seq}", mint="m1", txType="migrate", pool="pump-amm"),
        source="feed/r1",
        time=1.0,
        seq=seq,
    )


async def test_a_failing_handler_is_retried_then_given_a_dead_letter_reason():
    calls: list[int] = []

    async def failing(event) -> None:
        calls.append(event.seq)
        raise RuntimeError("cannot")

    subscription = Subscription(
        service="svc", patterns=("token.*",), handler=failing, max_attempts=3
    )
    dispatcher = Dispatcher(
        service="svc", lane="partition", event_log=EventLog("none"), retry_backoff=0.0
    )
    reason = await dispatcher.dispatch(migrated(1), subscription)
    assert reason == "handler failed 3 times: RuntimeError: cannot"
    assert calls == [1, 1, 1]


async def test_the_dispatcher_keeps_no_memory_of_keys():
    """Redeliveries and old seqs reach the handler: dropping them is the consumer's job."""
    calls: list[int] = []

    async def handler(event) -> None:
        calls.append(event.seq)

    subscription = Subscription(service="svc", patterns=("token.*",), handler=handler)
    dispatcher = Dispatcher(service="svc", lane="partition", event_log=EventLog("none"))
    event = migrated(2)
    for delivered in (event, event, migrated(1)):
        assert await dispatcher.dispatch(delivered, subscription) is None
    assert calls == [2, 2, 1]


async def test_a_held_service_takes_its_deliveries_in_order_once_released():
    calls: list[tuple[str, int]] = []

    def subscription(service: str) -> Subscription:
        async def handle(event) -> None:
            calls.append((service, event.seq))

        return Subscription(service=service, patterns=("token.*",), handler=handle)

    held = Dispatcher(service="held", lane="partition", event_log=EventLog("none"))
    other = Dispatcher(service="other", lane="partition", event_log=EventLog("none"))
    hold("held")
    try:
        waiting = [
            asyncio.create_task(held.dispatch(migrated(seq), subscription("held")))
            for seq in (1, 2)
        ]
        await other.dispatch(migrated(1), subscription("other"))
        await asyncio.sleep(0)
        assert calls == [("other", 1)]  # the other service is not held
        assert not any(task.done() for task in waiting)
    finally:
        release("held")
    assert await asyncio.gather(*waiting) == [None, None]
    assert calls == [("other", 1), ("held", 1), ("held", 2)]


async def test_a_handler_start_counts_its_events_age_since_the_feeds_receipt():
    """pumpflow_receipt_age_seconds: the wall time from the feed's receipt of the causal
    chain's first frame to a handler's start, per event, alone or in a batch."""

    async def handled(event) -> None:
        pass

    async def handled_batch(events) -> None:
        pass

    subscription = Subscription(
        service="receipt-age", patterns=("token.*",), handler=handled,
        batch_handler=handled_batch, window=4,
    )  # fmt: skip
    dispatcher = Dispatcher(service="receipt-age", lane="partition", event_log=EventLog("none"))
    received = time.time() - 0.03
    chained = make_event(
        TokenMigrated(signature="s1", mint="m1", txType="migrate", pool="pump-amm"),
        source="features/r1", time=1.0, seq=1, received_at=received,
    )  # fmt: skip
    assert await dispatcher.dispatch(chained, subscription) is None
    assert await dispatcher.dispatch_batch([chained, migrated(2)], subscription) == []
    receipt = series("receipt-age", "token.migrated", "partition").receipt
    # two events with a receipt, none counted for the one without
    assert receipt.count == 2
    assert 0.03 <= receipt.total / receipt.count < 5.0


def test_a_histogram_counts_a_list_of_values_as_each_value_alone():
    """A batch's ages are observed at once; the buckets hold what one by one gives,
    bounds included (a value equal to a bound is in that bound's bucket)."""
    values = [0.0, 0.001, 0.0011, 0.01, 0.01, 7.5, 300.0, 301.0, -1.0, 0.2, 0.25]
    one_by_one, at_once = Histogram(AGE_BUCKETS), Histogram(AGE_BUCKETS)
    for value in values:
        one_by_one.observe(value)
    at_once.observe_many(list(values))
    assert at_once.counts == one_by_one.counts
    assert at_once.total == pytest.approx(one_by_one.total)
    empty = Histogram(AGE_BUCKETS)
    empty.observe_many([])
    assert empty.count == 0


async def test_a_batch_of_several_types_counts_each_types_events_in_its_series():
    async def handled_batch(events) -> None:
        pass

    subscription = Subscription(
        service="batch-types", patterns=("token.*",), handler=handled_batch,
        batch_handler=handled_batch, window=8,
    )  # fmt: skip
    dispatcher = Dispatcher(service="batch-types", lane="partition", event_log=EventLog("none"))
    created = make_event(
        TokenCreated(signature="c1", mint="m1", traderPublicKey="w", txType="create",
                     initialBuy=1.0, solAmount=0.1, bondingCurveKey="b",
                     vTokensInBondingCurve=1e9, vSolInBondingCurve=30.0, marketCapSol=30.0,
                     name="n", symbol="s", uri="u"),
        source="feed/r1", time=time.time() - 0.02, seq=1, received_at=time.time() - 0.02,
    )  # fmt: skip
    batch = [created, migrated(2), migrated(3)]
    assert await dispatcher.dispatch_batch(batch, subscription) == []
    migrations = series("batch-types", "token.migrated", "partition")
    creations = series("batch-types", "token.created", "partition")
    assert (migrations.consumed, migrations.age.count, migrations.receipt.count) == (2, 2, 0)
    assert (creations.consumed, creations.age.count, creations.receipt.count) == (1, 1, 1)
    assert (migrations.handler.count, creations.handler.count) == (2, 1)
    assert 0.02 <= creations.age.total < 5.0


async def test_a_batch_handled_alone_after_its_call_failed_counts_each_events_age_once():
    """The events of a batch whose call raised are dispatched one by one: still one
    delivery each, so one age and one receipt age each, and consumed once."""
    calls: list[int] = []

    async def handled(event) -> None:
        calls.append(event.seq)

    async def failing_batch(events) -> None:
        raise RuntimeError("the batch's call fails")

    subscription = Subscription(
        service="batch-fails", patterns=("token.*",), handler=handled,
        batch_handler=failing_batch, window=4,
    )  # fmt: skip
    dispatcher = Dispatcher(service="batch-fails", lane="partition", event_log=EventLog("none"))
    received = time.time() - 0.01
    batch = [
        make_event(
            TokenMigrated(signature=f"s{seq}", mint="m1", txType="migrate", pool="pump-amm"),
            source="feed/r1",
            time=1.0,
            seq=seq,
            received_at=received,
        )
        for seq in (1, 2, 3)
    ]
    assert await dispatcher.dispatch_batch(batch, subscription) == []
    assert calls == [1, 2, 3]
    stats = series("batch-fails", "token.migrated", "partition")
    assert (stats.consumed, stats.age.count, stats.receipt.count) == (3, 3, 3)
