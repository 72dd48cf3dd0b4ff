"""BusHarness on both transports, the fixture factory, and the process stack."""

from __future__ import annotations

import sys

import aio_pika
import pytest

from pumpflow.common.bus import Subscription
from pumpflow.common.testing import (
    BusHarness,
    EventCollector,
    TokenEvents,
    eventually,
    settings_env,
    stack_env,
)
from pumpflow.common.testing.plugin import bus_harness_fixture

harness8 = bus_harness_fixture(partitions=8, synchronous=True)


async def test_buses_of_the_harness_share_one_broker(bus_harness, namespace):
    one, two = await bus_harness.bus("feed/a"), await bus_harness.bus("feed/b")
    if bus_harness.transport == "memory":
        assert one is two  # one process, one shared bus
    else:
        assert one is not two and one.namespace == two.namespace == namespace
    assert one.partitions == two.partitions == 4 and one.is_healthy()
    probe = await bus_harness.collector("token.*", name=f"p_{namespace}", bus=two)
    tokens = TokenEvents()
    await one.publish(tokens.created())
    assert len(await probe.wait_for(1, "token.created")) == 1


async def test_restart_consumer_resumes_the_service_where_it_stopped(bus_harness, namespace):
    service = f"svc_{namespace}"
    feed = await bus_harness.bus("feed/test")
    svc_bus = await bus_harness.bus("svc/1")
    first = await EventCollector("first").attach(svc_bus, "token.*", service=service)
    tokens = TokenEvents()
    mint = tokens.mint()
    await feed.publish_many([tokens.created(mint), tokens.buy(mint)])
    await first.wait_for(2)
    second = EventCollector("second")
    old = first.subscriptions[0]
    new = Subscription(service=service, patterns=old.patterns, handler=second)
    await bus_harness.restart_consumer(svc_bus, old, new)
    await feed.publish(tokens.sell(mint))
    (sell,) = await second.wait_for(1, "token.trade")
    assert sell.seq == 3 and first.count() == 2


async def test_the_fixture_factory_sets_partitions_and_ids(harness8, request):
    bus = await harness8.bus()
    assert bus.partitions == 8
    assert request.node.callspec.id == harness8.transport
    assert (request.node.get_closest_marker("rabbitmq") is not None) == (
        harness8.transport == "rabbitmq"
    )
    if harness8.transport == "memory":
        assert bus.synchronous
        with pytest.raises(ValueError, match="has 8 partitions, not 2"):
            await harness8.bus(partitions=2)


@pytest.mark.rabbitmq
async def test_rabbitmq_teardown_deletes_what_was_declared(namespace, amqp_url):
    async with BusHarness("rabbitmq", namespace=namespace, amqp_url=amqp_url) as harness:
        probe = await harness.collector("token.*", name="probe")
        assert probe.subscriptions
        harness.delete_after(["elsewhere"])
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for queue in (f"{namespace}.probe.p00", f"{namespace}.probe.dlq"):
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue, passive=True)


async def test_the_rabbitmq_harness_marks_its_tests(rabbitmq_harness, request):
    assert request.node.get_closest_marker("rabbitmq") is not None
    assert rabbitmq_harness.transport == "rabbitmq"


def test_settings_become_environment_variables():
    assert settings_env(heartbeat_ttl_s=3.0, feed_record=False, PUMPPORTAL_WS_URL="ws://x") == {
        "PUMPFLOW_HEARTBEAT_TTL_S": "3.0",
        "PUMPFLOW_FEED_RECORD": "false",
        "PUMPPORTAL_WS_URL": "ws://x",
    }
    env = stack_env(
        namespace="t1", amqp_url="amqp://h/v", redis_url="redis://r", base={"PATH": "/bin"}
    )
    assert env["PATH"] == "/bin"
    assert env["PUMPFLOW_NAMESPACE"] == "t1" and env["PUMPFLOW_TRANSPORT"] == "rabbitmq"
    assert env["PUMPFLOW_AMQP_URL"] == "amqp://h/v" and env["PUMPFLOW_PARTITIONS"] == "4"


WAITS_FOR_SIGTERM = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print(os.environ["PUMPFLOW_NAMESPACE"], os.environ["PUMPFLOW_REPLICA"], flush=True)
signal.sigwait({signal.SIGTERM})
print("terminated", flush=True)
sys.exit(3)
"""


async def test_process_stack_runs_processes_in_the_test_namespace(process_stack, namespace):
    process_stack.configure(replica="r1")
    process_stack.start("waiter", [sys.executable, "-c", WAITS_FOR_SIGTERM])
    await eventually(lambda: f"{namespace} r1" in process_stack.logs(), what="the greeting")
    assert await process_stack.stop("waiter") == 3
    assert "--- waiter\n" in process_stack.logs() and "terminated" in process_stack.logs()
    for name in ("a", "b"):
        process_stack.start(name, [sys.executable, "-c", WAITS_FOR_SIGTERM], replica=name)
    await eventually(lambda: f"{namespace} b" in process_stack.logs(), what="b's greeting")
    await eventually(lambda: f"{namespace} a" in process_stack.logs(), what="a's greeting")
    assert await process_stack.stop_all(["a", "b"]) == {"a": 3, "b": 3}
    process_stack.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    await process_stack.aclose()  # what is left is killed
    assert process_stack.procs["sleeper"].returncode is not None
