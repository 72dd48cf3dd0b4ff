"""The consume-side logic both transports share."""

from __future__ import annotations

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.dispatch import Dispatcher
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.events import TokenMigrated, make_event


async def test_a_dead_lettered_event_counts_as_done_only_once_its_letter_is_stored():
    calls: list[int] = []

    async def failing(event) -> None:
        calls.append(event.seq)
        raise RuntimeError("cannot")

    subscription = Subscription(
        service="svc", patterns=("token.*",), handler=failing, max_attempts=1
    )
    dispatcher = Dispatcher(service="svc", lane="partition", event_log=EventLog("none"))
    event = make_event(
        TokenMigrated(signature="s", mint="m1", txType="migrate", pool="pump-amm"),
        source="feed/r1",
        time=1.0,
        seq=1,
    )
    assert await dispatcher.dispatch(event, subscription) is not None
    # the dead letter was never stored (a lost write): the redelivery is not a duplicate
    assert await dispatcher.dispatch(event, subscription) is not None
    assert calls == [1, 1]
    dispatcher.settled(event, subscription)
    # stored now: a further redelivery is dropped as a duplicate, the handler not run
    assert await dispatcher.dispatch(event, subscription) is None
    assert calls == [1, 1]
