"""The consume-side logic both transports share."""

from __future__ import annotations

import asyncio
import time

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.dispatch import Dispatcher, hold, release
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.metrics import series
from pumpflow.common.events import TokenMigrated, make_event


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
