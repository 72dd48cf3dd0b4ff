"""Run several services in one process over one in-memory bus and one in-process store.

    async with run_embedded([FeedService, FeaturesService], clock=ReplayClock()) as system:
        await system.bus.publish(...)
        await system.drain()

Services start in the given order and stop in reverse order; each gets its own
:class:`ServiceContext` (its own settings, so its own name and event source) around
the shared bus, store, clock and, when given, Postgres pool. A test may bring the bus
(RabbitMQ, say): the services run on it as they would in-process on the broker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.bus.routing import DEFAULT_PARTITIONS
from pumpflow.common.clock import Clock
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.topology import CONSUMER_GROUPS, declare_groups
from pumpflow.common.state.abc import StateStore
from pumpflow.common.state.memory import MemoryStateStore

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("pumpflow.embedded")


@dataclass(kw_only=True)
class EmbeddedSystem:
    """The running services and what they share."""

    bus: EventBus
    store: StateStore
    clock: Clock
    db: asyncpg.Pool | None = None
    services: dict[str, Service] = field(default_factory=dict)
    contexts: dict[str, ServiceContext] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    async def drain(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 (bus interface)
        """Wait until every published event is handled (immediate when synchronous)."""
        return await self.bus.drain(timeout)


def _build(
    entry: Service | type[Service], overrides: Mapping[str, Any], partitions: int
) -> Service:
    if isinstance(entry, Service):
        return entry
    return entry(
        entry.settings_class.load(
            service=entry.name, transport="memory", partitions=partitions, **overrides
        )
    )


@contextlib.asynccontextmanager
async def run_embedded(
    services: Sequence[Service | type[Service]],
    *,
    clock: Clock,
    partitions: int = DEFAULT_PARTITIONS,
    synchronous: bool = False,
    store: StateStore | None = None,
    db: asyncpg.Pool | None = None,
    settings: Mapping[str, Any] | None = None,
    drain_timeout_s: float = 10.0,
    bus: EventBus | None = None,
) -> AsyncIterator[EmbeddedSystem]:
    """Start ``services`` (classes, or instances with their own settings) on a shared bus.

    ``settings`` are overrides applied to every service's settings (besides its name,
    the memory transport and ``partitions``). On exit the bus is drained, services
    stop in reverse order, and the bus is closed, unless it is ``bus``: a bus of the
    caller's, started and closed by it (``partitions`` and ``synchronous`` are its own).
    """
    own_bus = bus is None
    if bus is None:
        bus = InMemoryBus(partitions=partitions, synchronous=synchronous, source="embedded")
    partitions = bus.partitions
    system = EmbeddedSystem(
        bus=bus, store=store if store is not None else MemoryStateStore(clock), clock=clock, db=db
    )
    built = [_build(entry, settings or {}, partitions) for entry in services]
    names = [s.settings.service for s in built]
    if len(set(names)) != len(names):
        raise ValueError(f"each embedded service needs its own name, got {names}")
    if own_bus:
        await bus.start()
    # the groups run here, declared before any of them starts publishing
    await declare_groups(bus, {n: p for n, p in CONSUMER_GROUPS.items() if n in names})
    started: list[Service] = []
    try:
        for service in built:
            name = service.settings.service
            ctx = ServiceContext(
                settings=service.settings, bus=bus, clock=clock, store=system.store, db=db
            )
            system.services[name] = service
            system.contexts[name] = ctx
            await service.start(ctx)
            started.append(service)
            log.debug("embedded: %s started", name)
        yield system
    finally:
        try:
            if not await bus.drain(drain_timeout_s):
                log.warning("embedded: events still in flight after %.1f s", drain_timeout_s)
        finally:
            for service in reversed(started):
                try:
                    await service.stop()
                except Exception:
                    log.exception("embedded: %s failed to stop", service.settings.service)
                # what a stopping service published still reaches the ones that run
                await bus.drain(drain_timeout_s)
            if own_bus:
                await bus.close()
            if store is None:
                await system.store.close()
