"""A harness that builds buses of either transport for the shared contract suite."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pumpflow.common.bus.abc import EventBus, Subscription
from pumpflow.common.bus.memory import InMemoryBus


@dataclass
class Harness:
    """Makes buses for one test and tears them down (RabbitMQ topology included)."""

    transport: str
    namespace: str
    amqp_url: str
    buses: list[EventBus] = field(default_factory=list)
    _memory: InMemoryBus | None = None

    async def bus(self, *, partitions: int = 4, prefetch: int = 256) -> EventBus:
        """A started bus. Memory: every call returns the one shared bus, which is what
        several processes sharing a broker look like inside one process."""
        if self.transport == "memory":
            if self._memory is None:
                self._memory = InMemoryBus(partitions=partitions, source="test/memory")
                await self._memory.start()
                self.buses.append(self._memory)
            return self._memory
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        bus = RabbitMQBus(
            url=self.amqp_url,
            namespace=self.namespace,
            partitions=partitions,
            prefetch=prefetch,
            source=f"test/{len(self.buses)}",
            connect_attempts=3,
        )
        await bus.start()
        self.buses.append(bus)
        return bus

    async def restart_consumer(
        self, bus: EventBus, old: Subscription, new: Subscription
    ) -> EventBus:
        """Stop consuming ``old`` mid-stream and resume the service as ``new``.

        RabbitMQ: the consuming bus is closed (its connection goes, like a killed
        process) and a fresh bus subscribes on the same namespace. Memory: its queues
        live in the bus object and cannot outlive a process, so the subscription is
        replaced on the same bus, which is what survives in that mode.
        """
        if self.transport == "memory":
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
        connection closes under it, as when its process dies (its handlers still run,
        their acks go nowhere). Memory: :meth:`InMemoryBus.abandon`.
        """
        if self.transport == "memory":
            assert isinstance(bus, InMemoryBus)
            await bus.abandon(old)
            await bus.subscribe(new)
            return bus
        await bus._connection.close()
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
        return all(consumer.unacked is None for consumer in bus._consumers)

    async def teardown(self) -> None:
        for bus in reversed(self.buses):
            if self.transport == "rabbitmq":
                await bus.delete_topology()
            await bus.close()


TRANSPORTS = [
    pytest.param("memory", id="memory"),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


@pytest.fixture(params=TRANSPORTS)
async def harness(request, namespace, amqp_url):
    h = Harness(transport=request.param, namespace=namespace, amqp_url=amqp_url)
    try:
        yield h
    finally:
        await h.teardown()


@pytest.fixture
async def bus(harness) -> EventBus:
    """A started bus with 4 partitions."""
    return await harness.bus()


@pytest.fixture
def service(namespace) -> str:
    """A consuming service name of this test only, so metric series are its own."""
    return f"svc_{namespace}"
