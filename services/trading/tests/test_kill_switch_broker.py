"""The kill switch while the broker takes no publication (short of memory or disk, it
blocks every publisher; or frozen): a halt applies at once, is stored, and is answered;
its announcement goes out once the broker takes publications again."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus import Subscription
from pumpflow.common.bus.rabbitmq import RabbitMQBus
from pumpflow.common.clock import WallClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.testing import eventually
from pumpflow.common.testing.proxy import TcpProxy
from pumpflow.common.trading import TradingState
from pumpflow.trading.ledger import PostgresLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

PARTITIONS = 2
#: the halt's answer waits this long for the ledger; the test allows it ten times over
STORE_WAIT_S = 0.5


async def test_a_halt_is_answered_while_the_broker_takes_no_publication(
    namespace, amqp_url, pg_pool
):
    settings = TradingSettings.load(
        service="trading",
        namespace=namespace,
        partitions=PARTITIONS,
        trading_halt_store_wait_s=STORE_WAIT_S,
    )
    announced: list[Event] = []

    async def heard(event: Event) -> None:
        announced.append(event)

    clock = WallClock()
    async with TcpProxy(urlsplit(amqp_url).port or 5672) as proxy:
        buses = [
            RabbitMQBus(url=url, namespace=namespace, partitions=PARTITIONS, source=source)
            for url, source in ((proxy.url(amqp_url), "trading/t"), (amqp_url, "watch/w"))
        ]
        bus, watch = buses
        for each in buses:
            await each.start()
        await watch.subscribe(
            Subscription(service="watch", patterns=("trading.state",), handler=heard)
        )
        service = TradingService(
            settings, registry=CollectorRegistry(), ledger=PostgresLedger(pg_pool)
        )
        ctx = ServiceContext(
            settings=settings, bus=bus, clock=clock, store=MemoryStateStore(clock), db=pg_pool
        )
        try:
            await service.start(ctx)
            await eventually(lambda: service.role == "active", what="trading held")
            proxy.freeze()
            body = await asyncio.wait_for(service.halt("the broker is blocked"), 10 * STORE_WAIT_S)
            assert body["state"] == "halted" and body["stored"] is True, body
            assert service.risk.state is TradingState.HALTED
            assert await service.ledger.control() == ("halted", "the broker is blocked")
            assert announced == []

            proxy.thaw()
            await eventually(lambda: announced, 30, what="the halt announced")
            [halted] = [e.data for e in announced]
            assert halted.state == "halted" and halted.reason == "the broker is blocked"
        finally:
            proxy.thaw()
            await service.stop()
            for each in buses:
                await each.delete_topology()
                await each.close()
