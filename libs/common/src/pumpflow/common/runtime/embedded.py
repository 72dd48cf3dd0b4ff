"""Run several services in one process over one in-memory bus and one in-process store.

    async with run_embedded([FeedService, FeaturesService], clock=ReplayClock()) as system:
        await system.bus.publish(...)
        await system.drain()

Services start in the given order and stop in reverse order; each gets its own
:class:`ServiceContext` (its own settings, so its own name and event source) around
the shared bus, store, clock and, when given, Postgres pool. A test may bring the bus
(RabbitMQ, say): the services run on it as they would in-process on the broker.

The bus is drained before the services stop and after each one stops. On the run's own
in-memory bus, the groups of the services stopped are unbound first, what is queued for
them dropped (a line says what): a paper fill that comes due after the exit service
stopped would wait for nobody, and every drain after it to its timeout. A drain that
times out says so.
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
        # as the distributed runtime: each notes what stopping leaves while it holds it
        for service in reversed(started):
            try:
                service.stopping()
            except Exception:
                name = service.settings.service
                log.exception("embedded: %s failed to note what it leaves", name)
        try:
            await _drain(bus, drain_timeout_s, when="before the services stop", own=own_bus)
        finally:
            for service in reversed(started):
                name = service.settings.service
                try:
                    await service.stop()
                except Exception:
                    log.exception("embedded: %s failed to stop", name)
                # what a stopping service published still reaches the ones that run
                await _drain(bus, drain_timeout_s, when=f"after {name} stopped", own=own_bus)
            if own_bus:
                await bus.close()
            if store is None:
                await system.store.close()


async def _drain(bus: EventBus, timeout: float, *, when: str, own: bool) -> None:  # noqa: ASYNC109
    """Drain ``bus`` (``own``: the run's in-memory bus, whose groups no service consumes
    any more lose what is queued for them first); say what it dropped, and a timeout."""
    if own and isinstance(bus, InMemoryBus):
        for group, types in bus.drop_unconsumed().items():
            count = sum(types.values())
            if not count:
                log.debug("embedded: %s, nothing consumes %s any more: what comes for it is "
                          "dropped", when, group)  # fmt: skip
                continue
            log.info("embedded: %s, %d event%s for %s (stopped) dropped: %s", when, count,
                     "" if count == 1 else "s", group,
                     ", ".join(f"{name} {n}" for name, n in sorted(types.items())))  # fmt: skip
    if not await bus.drain(timeout):
        log.warning("embedded: %s, events still in flight after %.1f s", when, timeout)
