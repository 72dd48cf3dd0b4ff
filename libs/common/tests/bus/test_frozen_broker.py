"""A RabbitMQ bus closes within a bound while its broker is frozen.

A frozen broker (a stopped host, a network lost with the sockets still open) takes
frames and answers none. The bus reaches the broker through a proxy of the test's own
that stops forwarding, so the machine's broker stays untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from urllib.parse import urlsplit

import pytest

from pumpflow.common.bus import Subscription
from pumpflow.common.events import Event
from pumpflow.common.testing import eventually
from pumpflow.common.testing.proxy import TcpProxy

from .test_publish_order import trade_event

pytestmark = pytest.mark.rabbitmq

#: inside the runner's bound for a close step (10 s): the cancels and the channels'
#: closes (CANCEL_WAIT_S each), then the connections' closes side by side, each
#: bounded by the client (about 2 s)
CLOSE_WITHIN_S = 8.0


async def test_close_returns_within_its_bound_while_the_broker_is_frozen(namespace, amqp_url):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    service = f"svc_{namespace}"
    handled: list[Event] = []

    async def record(event: Event) -> None:
        handled.append(event)

    async with TcpProxy(urlsplit(amqp_url).port or 5672) as proxy:
        bus = RabbitMQBus(
            url=proxy.url(amqp_url), namespace=namespace, partitions=2, source="feed/r1"
        )
        await bus.start()
        try:
            # both connections: the partitions' (bulk) and the critical lane's (main)
            patterns = ("token.*", "exit.*")
            await bus.declare(service, patterns)
            await bus.subscribe(Subscription(service=service, patterns=patterns, handler=record))
            await bus.publish(trade_event("mintF", 1))
            await eventually(lambda: handled, what="the event handled")
            proxy.freeze()
            await asyncio.wait_for(bus.close(), CLOSE_WITHIN_S)
            assert not bus._connections()
        finally:
            proxy.thaw()
            await bus.close()
    cleanup = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="cleanup/1")
    await cleanup.delete_topology(services=[service])
    await cleanup.close()


async def test_a_publication_the_broker_holds_is_work_waiting_on_rabbitmq_until_it_settles(
    namespace, amqp_url, monkeypatch
):
    """A broker that blocks publishers (a memory or disk alarm) or answers nothing holds
    a publication unconfirmed: past UNCONFIRMED_WAIT_S it counts as waiting on RabbitMQ,
    named with why, and stops counting once confirmed."""
    from prometheus_client import REGISTRY

    from pumpflow.common.bus import rabbitmq
    from pumpflow.common.dependencies import RABBITMQ, WAITS

    monkeypatch.setattr(rabbitmq, "UNCONFIRMED_WAIT_S", 0.5)
    service = f"svc_{namespace}"
    handled: list[Event] = []

    async def record(event: Event) -> None:
        handled.append(event)

    def waiting() -> float | None:
        return REGISTRY.get_sample_value("pumpflow_dependency_waiting", {"dependency": RABBITMQ})

    async with TcpProxy(urlsplit(amqp_url).port or 5672) as proxy:
        bus = rabbitmq.RabbitMQBus(
            url=proxy.url(amqp_url), namespace=namespace, partitions=2, source="feed/r1"
        )
        await bus.start()
        try:
            await bus.declare(service, ("token.*",))
            await bus.subscribe(
                Subscription(service=service, patterns=("token.*",), handler=record)
            )
            await bus.publish(trade_event("mintA", 1))
            assert RABBITMQ not in WAITS.describe()
            proxy.freeze()
            held = asyncio.create_task(bus.publish(trade_event("mintA", 2)))
            await eventually(lambda: RABBITMQ in WAITS.describe(), what="the wait named")
            assert "unconfirmed" in WAITS.describe()[RABBITMQ]["error"]
            # a broker that does not answer is told from one that blocks publishers
            why = bus.why_unconfirmed()
            assert re.match(r"RabbitMQ has not confirmed it for \d+ s", why), why
            assert "no resource alarm blocks publishers" in why, why
            assert waiting() == 1 and not held.done()
            proxy.thaw()
            await asyncio.wait_for(held, 30)
            assert RABBITMQ not in WAITS.describe() and waiting() == 0
            await eventually(lambda: len(handled) == 2, what="both events handled")
        finally:
            proxy.thaw()
            await bus.close()
    cleanup = rabbitmq.RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="c/1")
    await cleanup.delete_topology(services=[service])
    await cleanup.close()


@pytest.mark.slow
async def test_a_resource_alarm_is_said_with_the_brokers_reason_until_it_clears(
    own_rabbitmq, namespace
):
    """RabbitMQ raises its memory alarm (on a broker of the test's own): it blocks the
    publishing connection and says why (connection.blocked); a publication unconfirmed
    meanwhile is said to wait for that, not for a broker that does not answer."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    def watermark(fraction: str) -> None:
        done = own_rabbitmq.ctl("set_vm_memory_high_watermark", fraction)
        assert done.returncode == 0, done.stdout + done.stderr

    bus = RabbitMQBus(url=own_rabbitmq.url, namespace=namespace, partitions=2, source="feed/r1")
    await bus.start()
    try:
        await bus.publish(trade_event("mintA", 1))
        await asyncio.to_thread(watermark, "0")
        held = asyncio.create_task(bus.publish(trade_event("mintA", 2)))
        await eventually(
            lambda: "RabbitMQ blocks publishers: low on memory" in bus.why_unconfirmed(),
            30,
            what="the alarm's reason said",
        )
        assert not held.done()
        await asyncio.to_thread(watermark, "0.4")
        await asyncio.wait_for(held, 30)
        assert "RabbitMQ blocks publishers" not in bus.why_unconfirmed(), bus.why_unconfirmed()
    finally:
        with contextlib.suppress(AssertionError):
            await asyncio.to_thread(watermark, "0.4")
        await bus.close()
