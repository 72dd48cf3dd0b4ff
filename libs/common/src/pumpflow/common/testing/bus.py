"""A bus harness: started buses of either transport for one test, torn down after it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

from pumpflow.common.bus.abc import EventBus, Subscription
from pumpflow.common.bus.journal import SharedDeliveryJournal
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing.collector import EventCollector
from pumpflow.common.testing.proxy import TcpProxy

MEMORY = "memory"
RABBITMQ = "rabbitmq"
TRANSPORTS = (MEMORY, RABBITMQ)


class BusHarness:
    """Makes started buses of one transport for a test and tears them all down.

    ``memory``: every :meth:`bus` call returns one shared bus, which is what several
    processes on one broker look like inside one process. ``rabbitmq``: a bus (its own
    connection, like a process) per call, all in ``namespace`` on ``amqp_url``; the
    teardown deletes what they declared, and the durable queues of :meth:`delete_after`.
    Each one counts redeliveries in a journal of its own over one store they share
    (``journal_store``), as a service's replicas do over Redis.
    """

    def __init__(
        self,
        transport: str,
        *,
        namespace: str,
        amqp_url: str | None = None,
        partitions: int = 4,
        prefetch: int = 256,
        synchronous: bool = False,
    ):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; one of {TRANSPORTS}")
        if transport == RABBITMQ and not amqp_url:
            raise ValueError("a rabbitmq harness needs amqp_url")
        self.transport = transport
        self.namespace = namespace
        self.amqp_url = amqp_url
        self.partitions = partitions
        self.prefetch = prefetch
        #: memory only: handlers run inside publish (deterministic, for replays)
        self.synchronous = synchronous
        self.buses: list[EventBus] = []
        self._memory: InMemoryBus | None = None
        self._services: set[str] = set()
        #: the store the RabbitMQ buses' delivery journals share
        self.journal_store = MemoryStateStore()

    async def __aenter__(self) -> BusHarness:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.teardown()

    async def bus(
        self,
        source: str | None = None,
        *,
        partitions: int | None = None,
        prefetch: int | None = None,
        connect_attempts: int = 3,
    ) -> EventBus:
        """A started bus publishing as ``source`` (default ``test/<n>``).

        Memory: the one shared bus, whose source and partitions are those of the first call.
        """
        partitions = partitions or self.partitions
        if self.transport == MEMORY:
            if self._memory is None:
                self._memory = InMemoryBus(
                    partitions=partitions,
                    synchronous=self.synchronous,
                    source=source or "test/memory",
                )
                await self._memory.start()
                self.buses.append(self._memory)
            elif partitions != self._memory.partitions:
                raise ValueError(
                    f"the shared memory bus has {self._memory.partitions} partitions, "
                    f"not {partitions}"
                )
            return self._memory
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        bus = RabbitMQBus(
            url=self.amqp_url,
            namespace=self.namespace,
            partitions=partitions,
            prefetch=prefetch or self.prefetch,
            source=source or f"test/{len(self.buses)}",
            connect_attempts=connect_attempts,
            journal=SharedDeliveryJournal(self.journal_store),
        )
        await bus.start()
        self.buses.append(bus)
        return bus

    async def collector(
        self,
        *patterns: str,
        name: str = "collector",
        bus: EventBus | None = None,
        **options: Any,
    ) -> EventCollector:
        """An :class:`EventCollector` subscribed to ``patterns`` (on a bus of its own by default).

        ``options`` go to the Subscription (``service``, ``window``, ...).
        """
        bus = bus or await self.bus(f"{name}/1")
        return await EventCollector(name).attach(bus, *patterns, **options)

    async def restart_consumer(
        self, bus: EventBus, old: Subscription, new: Subscription
    ) -> EventBus:
        """Stop consuming ``old`` mid-stream and resume the service as ``new``; return its bus.

        RabbitMQ: the consuming bus is closed (its connection goes, like a killed
        process) and a fresh bus subscribes on the same namespace. Memory: its queues
        live in the bus object and cannot outlive a process, so the subscription is
        replaced on the same bus, which is what survives in that mode.
        """
        if self.transport == MEMORY:
            assert isinstance(bus, InMemoryBus)
            await bus.unsubscribe(old)
            await bus.subscribe(new)
            return bus
        await bus.close()
        fresh = await self.bus(partitions=bus.partitions)
        await fresh.subscribe(new)
        return fresh

    async def crash_consumer(self, bus: EventBus, old: Subscription, new: Subscription) -> EventBus:
        """Kill the consumer of ``old`` with its handlers in flight; resume as ``new``.

        Whatever it did not ack goes to ``new``. RabbitMQ: the consuming bus's
        connections close under it, as when its process dies (its handlers still run,
        their acks go nowhere). Memory: :meth:`InMemoryBus.abandon`.
        """
        if self.transport == MEMORY:
            assert isinstance(bus, InMemoryBus)
            await bus.abandon(old)
            await bus.subscribe(new)
            return bus
        for connection in bus._connections():  # type: ignore[attr-defined]
            await connection.close()
        fresh = await self.bus(partitions=bus.partitions)
        await fresh.subscribe(new)
        return fresh

    @staticmethod
    def no_ack_held_back(bus: EventBus) -> bool:
        """True once no returned message waits for its acknowledgement to be sent.

        RabbitMQ batches acks for up to ``ACK_LINGER_S``; the memory bus acks at once.
        """
        if isinstance(bus, InMemoryBus):
            return True
        return all(consumer.unacked is None for consumer in bus._consumers)  # type: ignore[attr-defined]

    def delete_after(self, services: Iterable[str]) -> None:
        """Also delete these services' durable queues at teardown (rabbitmq).

        For services whose queues another process declared (``pumpflow serve``).
        """
        self._services.update(services)

    async def teardown(self) -> None:
        """Delete what the buses declared (rabbitmq) and close them, the last made first."""
        failure: BaseException | None = None
        services = sorted(self._services)
        if self.transport == RABBITMQ and services and not self.buses:
            await self.bus("test/cleanup")
        if self.transport == RABBITMQ:
            # a queue deleted under another bus's consumer has the broker cancel it, and
            # that bus would consume it again (or restore it on reconnecting) meanwhile
            for bus in self.buses:
                try:
                    await bus.stop_consuming()
                except Exception as exc:
                    failure = failure or exc
        for bus in reversed(self.buses):
            try:
                if self.transport == RABBITMQ:
                    await bus.delete_topology(services=services)  # type: ignore[attr-defined]
                    services = []
            except Exception as exc:  # close the others all the same
                failure = failure or exc
            try:
                await bus.close()
            except Exception as exc:
                failure = failure or exc
        self.buses.clear()
        self._memory = None
        if failure is not None:
            raise failure


@contextlib.asynccontextmanager
async def proxied_buses(
    amqp_url: str, *, namespace: str, partitions: int, source: str
) -> AsyncIterator[tuple[TcpProxy, EventBus, EventBus]]:
    """A started RabbitMQ bus of ``source`` reaching the broker through a proxy (to
    freeze it: a broker that takes no publication), and a watching bus on the broker
    itself; what they declared is deleted after. Yields (proxy, the proxied bus, the
    watching bus)."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    async with TcpProxy(urlsplit(amqp_url).port or 5672) as proxy:
        buses = [
            RabbitMQBus(url=url, namespace=namespace, partitions=partitions, source=each)
            for url, each in ((proxy.url(amqp_url), source), (amqp_url, "watch/w"))
        ]
        try:
            for bus in buses:
                await bus.start()
            yield proxy, buses[0], buses[1]
        finally:
            proxy.thaw()
            for bus in buses:
                await bus.delete_topology()
                await bus.close()
