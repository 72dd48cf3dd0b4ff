"""Helpers of the exit service's tests: the service embedded, positions as trading
reports them, and the events it publishes."""

from __future__ import annotations

import contextlib
import itertools

from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event, ExitOrder, OrderFilled, PositionOpened, make_event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.abc import StateStore
from pumpflow.common.testing import EventCollector, TokenEvents
from pumpflow.exit.records import MemoryExitStore
from pumpflow.exit.service import ExitService
from pumpflow.exit.settings import ExitSettings

START = 1_700_000_000.0
_positions = itertools.count(1)


class Outage(ConnectionError):
    """A failure of the records' database that passes (a restart, say)."""

    transient_dependency = "postgres"


class FlakyExitStore(MemoryExitStore):
    """Records whose database is out for the first ``failures`` writes of a settled order."""

    def __init__(self, failures: int = 1):
        super().__init__()
        self.failures = failures

    def _write(self) -> None:
        if self.failures:
            self.failures -= 1
            raise Outage("the records' database is restarting")

    async def settle(self, order_id, outcome, time):
        self._write()
        return await super().settle(order_id, outcome, time)

    async def record_order(self, order):
        if order.state != "sent":
            self._write()
        return await super().record_order(order)


def exit_service(
    records: MemoryExitStore | None = None,
    *,
    registry: CollectorRegistry | None = None,
    **settings: object,
) -> ExitService:
    config = ExitSettings.load(service="exit", transport="memory", **settings)
    registry = CollectorRegistry() if registry is None else registry
    return ExitService(config, registry=registry, records=records or MemoryExitStore())


@contextlib.asynccontextmanager
async def embedded(
    clock: ReplayClock, *services, bus: EventBus | None = None, store: StateStore | None = None
):
    """``services`` on a synchronous in-memory bus, or on ``bus`` (their keys in ``store``,
    if given); a watch of their events."""
    async with run_embedded(
        list(services), clock=clock, synchronous=True, bus=bus, store=store
    ) as system:
        watch = await EventCollector("watch").attach(system.bus, "exit.*", "order.*", "position.*")
        yield system, watch


async def started(system, records: MemoryExitStore, **settings: object) -> ExitService:
    """A replica of the exit service started on ``system``'s bus and keys with ``records``
    (in the place of one stopped; the caller stops it)."""
    service = exit_service(records, **settings)
    await service.start(system.contexts["exit"])
    return service


async def on_broker(
    harness, service: ExitService, *, clock: ReplayClock, store: StateStore, partitions: int
) -> EventBus:
    """Start ``service`` as a process of its own runs it: its own bus on the broker of
    ``harness``, its keys in ``store``; that bus."""
    bus = await harness.bus(partitions=partitions, source="exit/test")
    ctx = ServiceContext(settings=service.settings, bus=bus, clock=clock, store=store)
    await service.start(ctx)
    return bus


async def kill(service: ExitService, bus: EventBus) -> None:
    """``service`` (started :func:`on_broker`) dies as a process killed -9 does: nothing
    more of it runs, and the deliveries it did not ack go back to the broker."""
    for task in (service._poll, service._graceful, *service._tasks):
        if task is not None:
            task.cancel()
    await service.consumer.abandon()
    await bus.close()


def as_trading(bus: EventBus, clock: ReplayClock):
    """Publish a payload as trading does, now."""

    async def publish(payload) -> None:
        await bus.publish(make_event(payload, source="trading/test", time=clock.now()))

    return publish


async def hold(
    bus: EventBus, tokens: TokenEvents, mint: str, *, tokens_held: float, curve: bool = True
) -> PositionOpened:
    """Trading's position of ``tokens_held`` in ``mint`` after a whale's buy; without
    ``curve`` the exit sees no trade of the token (it sells it only in the final sweep)."""
    created = tokens.created(mint, sol=5.0)
    buy = tokens.buy(mint, "whale", sol=10.0)
    if curve:
        await bus.publish(created)
        await bus.publish(buy)
    position = opened(tokens, mint, tokens_held=tokens_held)
    await bus.publish(position)
    return position.data


def opened(tokens: TokenEvents, mint: str, *, tokens_held: float = 1e6) -> Event:
    """A position in ``mint`` bought at its curve's price now."""
    price = tokens.curves[mint].price
    payload = PositionOpened(
        position_id=f"pos-{next(_positions)}",
        mint=mint,
        token_amount=tokens_held,
        cost_sol=tokens_held * price,
        entry_price=price,
        mark_price=price,
    )
    return make_event(payload, source="trading/test", time=tokens.clock.now())


def filled(
    order: ExitOrder,
    price: float,
    time: float,
    *,
    tokens: float | None = None,
    venue: str | None = None,
) -> Event:
    """Trading's fill of an exit order (``tokens`` of it; all by default): 1% below
    ``price``, 3% short in SOL, on paper at ``venue`` (not said, by default)."""
    sold = order.token_amount if tokens is None else tokens
    fill = OrderFilled(
        order_id=order.order_id, mint=order.mint, side="sell", token_amount=sold,
        sol_amount=sold * price * 0.97, price=price * 0.99, fee_sol=0.01,
        position_id=order.position_id, venue=venue,
    )  # fmt: skip
    return make_event(fill, source="trading/test", time=time)
