"""The kill switch while the broker takes no publication (short of memory or disk, it
blocks every publisher; or frozen): a halt applies at once, is stored, and is answered;
a resume is stored, applies as soon as the round under way lets it, and is answered; the
announcements go out once the broker takes publications again, each once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.cli.api import UNPUBLISHED
from pumpflow.cli.main import build_parser
from pumpflow.common.clock import WallClock
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.common.testing.bus import proxied_buses
from pumpflow.common.testing.servers import local_app
from pumpflow.common.trading import TradingState
from pumpflow.trading.ledger import PostgresLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

PARTITIONS = 2
#: the halt's answer waits this long for the ledger (a loaded machine's Postgres can take
#: a few tenths of a second), and as long for the frozen broker; the test allows it ten
#: times over
STORE_WAIT_S = 2.0


async def test_a_halt_is_answered_while_the_broker_takes_no_publication(
    namespace, amqp_url, pg_pool
):
    async with trading_behind_proxy(namespace, amqp_url, pg_pool) as (
        proxy, service, _base, watch, bus
    ):  # fmt: skip
        proxy.freeze()
        body = await asyncio.wait_for(service.halt("the broker is blocked"), 10 * STORE_WAIT_S)
        assert body["state"] == "halted" and body["stored"] is True, body
        assert service.risk.state is TradingState.HALTED
        assert await service.ledger.control() == ("halted", "the broker is blocked")
        assert said(watch) == []

        proxy.thaw()
        await watch.wait_for(1, "trading.state", within=30)
        await watch.barrier(bus, event_type="trading.state")
        assert said(watch) == [("halted", "the broker is blocked")]
        assert body["announced"] is False, body
        assert "its announcement (trading.state) is not published yet" in body["detail"]


TOKEN = "kill-switch-token"


@contextlib.asynccontextmanager
async def trading_behind_proxy(namespace: str, amqp_url: str, pg_pool):
    """The replica trading, reaching the broker through a proxy and served over HTTP; a
    watch of its announcements on the broker itself. Yields (proxy, service, its URL,
    watch, the watch's bus)."""
    settings = TradingSettings.load(
        service="trading",
        namespace=namespace,
        partitions=PARTITIONS,
        api_token=TOKEN,
        trading_halt_store_wait_s=STORE_WAIT_S,
    )
    clock = WallClock()
    async with proxied_buses(
        amqp_url, namespace=namespace, partitions=PARTITIONS, source="trading/t"
    ) as (proxy, bus, watching):
        watch = await EventCollector("watch").attach(watching, "trading.state")
        service = TradingService(
            settings, registry=CollectorRegistry(), ledger=PostgresLedger(pg_pool)
        )
        ctx = ServiceContext(
            settings=settings, bus=bus, clock=clock, store=MemoryStateStore(clock), db=pg_pool
        )
        try:
            await service.start(ctx)
            await eventually(lambda: service.role == "active", what="trading held")
            async with local_app(create_app(service, ctx)) as base:
                try:
                    yield proxy, service, base, watch, watching
                finally:
                    # before the server stops: it waits for the calls in flight
                    proxy.thaw()
        finally:
            proxy.thaw()
            await service.stop()


async def pumpflow_trading(base: str, *argv: str) -> int:
    parsed = build_parser().parse_args(["trading", *argv, "--url", base])
    return await asyncio.wait_for(asyncio.to_thread(parsed.handler, parsed), 60)


def said(watch: EventCollector) -> list[tuple[str, str]]:
    return [(e.data.state, e.data.reason) for e in watch.of("trading.state")]


async def test_a_resume_applies_at_once_and_is_answered_while_the_broker_takes_nothing(
    namespace, amqp_url, pg_pool, monkeypatch, capsys
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with trading_behind_proxy(namespace, amqp_url, pg_pool) as (
        proxy, service, base, watch, bus
    ):  # fmt: skip
        assert await pumpflow_trading(base, "halt", "--reason", "before") == 0
        await watch.wait_for(1, "trading.state", within=30)
        capsys.readouterr()

        proxy.freeze()
        assert await pumpflow_trading(base, "resume", "--reason", "blocked") == UNPUBLISHED
        printed = capsys.readouterr()
        assert printed.out == "trading is active (blocked); role active\n", printed.out
        assert printed.err.startswith(
            "pumpflow trading: resumed in this replica at once and stored; its announcement "
            "(trading.state) is not published yet: RabbitMQ has not confirmed it"
        ), printed.err
        assert service.risk.state is TradingState.ACTIVE
        assert await service.ledger.control() == ("active", "blocked")
        assert said(watch) == [("halted", "before")]

        proxy.thaw()
        await watch.wait_for(2, "trading.state", within=30)
        await eventually(lambda: not service._announcing, what="the announcement out")
        await watch.barrier(bus, event_type="trading.state")
        assert said(watch) == [("halted", "before"), ("active", "blocked")]


async def test_a_resume_behind_a_round_the_broker_holds_is_stored_answered_then_applied(
    namespace, amqp_url, pg_pool, monkeypatch, capsys
):
    """The halt's announcement holds the round (the lock) while the broker takes
    nothing: the resume given then is stored and answered, and applies once the halt's
    announcement is out; both go out once, in order."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with trading_behind_proxy(namespace, amqp_url, pg_pool) as (
        proxy, service, base, watch, bus
    ):  # fmt: skip
        proxy.freeze()
        assert await pumpflow_trading(base, "halt", "--reason", "blocked") == UNPUBLISHED
        printed = capsys.readouterr()
        assert printed.out == "trading is halted (blocked); role active\n", printed.out
        # a round of its own (a tick's) may hold the lock and wait for the broker first
        assert re.match(
            r"pumpflow trading: halted in this replica at once; stored, so other replicas "
            r"and a restart keep it; its announcement \(trading\.state\) is not published "
            r"yet: (the round under way comes first, and )?RabbitMQ has not confirmed it",
            printed.err,
        ), printed.err

        assert await pumpflow_trading(base, "resume", "--reason", "unblocked") == UNPUBLISHED
        printed = capsys.readouterr()
        # not in force yet: the halt's round comes first
        assert printed.out == "trading is halted (blocked); role active\n", printed.out
        assert printed.err.startswith(
            "pumpflow trading: resume stored; not applied in this replica yet: the round "
            "under way comes first, and RabbitMQ has not confirmed it"
        ), printed.err
        assert await service.ledger.control() == ("active", "unblocked")
        assert said(watch) == []

        proxy.thaw()
        await watch.wait_for(2, "trading.state", within=30)
        await eventually(lambda: not service._announcing, what="the announcements out")
        assert service.risk.state is TradingState.ACTIVE
        await watch.barrier(bus, event_type="trading.state")
        assert said(watch) == [("halted", "blocked"), ("active", "unblocked")]
