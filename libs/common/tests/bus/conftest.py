"""The shared contract suite runs on the kit's BusHarness, once per transport."""

from __future__ import annotations

import pytest

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.testing import BusHarness

TRANSPORTS = [
    pytest.param("memory", id="memory"),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


@pytest.fixture(params=TRANSPORTS)
async def harness(request, namespace, amqp_url):
    h = BusHarness(request.param, namespace=namespace, amqp_url=amqp_url)
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
