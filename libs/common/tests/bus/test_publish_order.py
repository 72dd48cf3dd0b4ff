"""RabbitMQ publishing keeps each key's order when its connection is lost mid-stream.

The publisher's own AMQP connection is closed under it, as a network failure or a
broker restart closes it; the broker itself stays up (a restart is in the fault suite).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import aio_pika
import aiormq
import pytest

from pumpflow.common.bus import Subscription
from pumpflow.common.bus.batches import batch_parts
from pumpflow.common.events import Event, TokenTrade, decode_event, make_event
from pumpflow.common.testing import eventually

pytestmark = pytest.mark.rabbitmq

MINTS = 24
PER_MINT = 60
CHUNK = 96


def trade_event(mint: str, seq: int) -> Event:
    payload = TokenTrade(
        signature=f"sig-{mint}-{seq}",
        mint=mint,
        traderPublicKey="trader",
        txType="buy",
        tokenAmount=1000,
        newTokenBalance=1000,
        bondingCurveKey="curve",
        vTokensInBondingCurve=1_000_000_000,
        vSolInBondingCurve=30,
        marketCapSol=30,
        solAmount=0.5,
    )
    return make_event(payload, source="feed/r1", time=time.time(), seq=seq)


def out_of_order(arrivals: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per key, the first arrivals of its seqs when they are not 1, 2, 3, ... in order."""
    bad = {}
    for key, seqs in arrivals.items():
        first = list(dict.fromkeys(seqs))
        if first != list(range(1, len(first) + 1)):
            bad[key] = first
    return bad


async def drop_connection(bus) -> None:
    """Close the bus's AMQP connection as a network failure would; wait until it is back."""
    lost = bus._connection.transport.connection
    await lost.close(ConnectionError("simulated network failure"))
    await eventually(
        lambda: getattr(bus._connection.transport, "connection", lost) is not lost,
        within=20,
        what="a new connection",
    )


async def test_each_key_keeps_its_order_across_lost_connections(namespace, amqp_url):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    service = f"svc_{namespace}"
    consumer = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="c/1")
    publisher = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="feed/r1")
    arrivals: dict[str, list[int]] = defaultdict(list)

    async def record(event: Event) -> None:
        arrivals[event.key].append(event.seq)

    def distinct() -> int:
        return sum(len(set(seqs)) for seqs in arrivals.values())

    await consumer.start()
    await publisher.start()
    try:
        await consumer.subscribe(
            Subscription(service=service, patterns=("token.*",), handler=record)
        )
        # the mints interleaved, as the market interleaves them
        events = [
            trade_event(f"mint{m:02d}", seq) for seq in range(1, PER_MINT + 1) for m in range(MINTS)
        ]
        chunks = [events[i : i + CHUNK] for i in range(0, len(events), CHUNK)]
        retries = 0

        async def produce() -> None:
            # as the recorder and the keyed consumer do: a failed call is made again whole
            nonlocal retries
            for chunk in chunks:
                while True:
                    try:
                        await publisher.publish_many(chunk)
                        break
                    except Exception:
                        retries += 1
                        await asyncio.sleep(0.05)

        producing = asyncio.create_task(produce())
        for share in (0.2, 0.5, 0.8):
            await eventually(
                lambda s=share: distinct() >= s * len(events),
                within=30,
                what=f"{share:.0%} of the events",
                details=lambda: f"{distinct()} arrived, {retries} calls failed",
            )
            await drop_connection(publisher)
        await producing
        await eventually(lambda: distinct() == len(events), within=30, what="every event")
        assert out_of_order(arrivals) == {}
    finally:
        await publisher.close()
        await consumer.delete_topology()
        await consumer.close()


async def test_a_publication_the_broker_nacks_is_written_again(namespace, amqp_url, caplog):
    """A queue that refuses a message (here: full, with reject-publish; in the wild: its
    process crashed and restarted) nacks it; the publication is written again."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.bus.routing import routing_key_for

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="feed/r1")
    await bus.start()
    try:
        channel = bus._channel
        queue = await channel.declare_queue(
            f"{namespace}.full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        first, second = trade_event("mintA", 1), trade_event("mintA", 2)
        await queue.bind(bus.exchange_name, routing_key=routing_key_for(first, 1))
        await bus.publish(first)
        caplog.set_level("WARNING", logger="pumpflow.common.bus.rabbitmq")
        publishing = asyncio.ensure_future(bus.publish(second))
        # the queue is full: the second is nacked, to be written again
        await eventually(
            lambda: any("DeliveryError" in r.getMessage() for r in caplog.records),
            within=5,
            what="the write nacked",
        )
        assert not publishing.done()
        taken = await queue.get(timeout=5)
        await taken.ack()
        await asyncio.wait_for(publishing, 10)
        again = await queue.get(timeout=5)
        assert again.message_id == second.id
    finally:
        await bus.close()


async def test_a_nacked_publication_holds_back_its_partition_alone(
    namespace, amqp_url, caplog, monkeypatch
):
    """While a nacked publication pauses before it is written again, a publication of
    another partition goes out at once; one of its own partition waits behind it."""
    from pumpflow.common.bus import rabbitmq
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.bus.routing import partition_of, routing_key_for

    # a pause far longer than the test: whatever waits for it does not finish
    monkeypatch.setattr(rabbitmq, "RESEND_PAUSE_S", 600.0)
    monkeypatch.setattr(rabbitmq, "RESEND_PAUSE_MAX_S", 600.0)
    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="feed/r1")
    await bus.start()
    try:
        refused = trade_event("mintA", 1)
        other = next(
            trade_event(f"mint{i}", 1)
            for i in range(100)
            if partition_of(f"mint{i}", 2) != partition_of("mintA", 2)
        )
        channel = bus._channel
        queue = await channel.declare_queue(
            f"{namespace}.full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await queue.bind(bus.exchange_name, routing_key=routing_key_for(refused, 2))
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=queue.name)
        caplog.set_level("WARNING", logger="pumpflow.common.bus.rabbitmq")
        pausing = asyncio.ensure_future(bus.publish(refused))
        await eventually(
            lambda: any("DeliveryError" in r.getMessage() for r in caplog.records),
            within=5,
            what="the write nacked",
        )
        behind = asyncio.ensure_future(bus.publish(trade_event("mintA", 2)))
        # confirmed by the broker (routed nowhere) while the nacked one pauses
        await asyncio.wait_for(bus.publish(other), 5)
        assert not pausing.done() and not behind.done()
        pausing.cancel()
        behind.cancel()
        await asyncio.gather(pausing, behind, return_exceptions=True)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await bus.close()


async def test_nacks_and_failed_writes_each_have_their_own_bound(namespace, amqp_url, caplog):
    """A publication nacked a few times (its queue full), whose writes then fail (its
    exchange gone: the broker closes the channel at each write) gives up after
    PUBLISH_ATTEMPTS failed writes, whatever the nacks before them counted."""
    import aiormq

    from pumpflow.common.bus.rabbitmq import PERSISTENT, Properties, RabbitMQBus

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="feed/r1")
    await bus.start()
    try:
        # declared apart from the bus's publishing channel, which would declare it again
        # on reopening
        admin = await bus._connection.channel()
        exchange = f"{namespace}.doomed"
        await admin.declare_exchange(exchange, durable=False)
        queue = await admin.declare_queue(
            f"{namespace}.full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await queue.bind(exchange, routing_key="k")
        properties = Properties(delivery_mode=PERSISTENT)
        await bus._publish_to(exchange, b"first", "k", properties)

        def nacks() -> int:
            return sum("DeliveryError" in r.getMessage() for r in caplog.records)

        caplog.set_level("WARNING", logger="pumpflow.common.bus.rabbitmq")
        publishing = asyncio.ensure_future(bus._publish_to(exchange, b"second", "k", properties))
        await eventually(lambda: nacks() >= 3, within=10, what="three nacks")
        await admin.exchange_delete(exchange)
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await asyncio.wait_for(publishing, 10)
        await queue.delete(if_unused=False, if_empty=False)
        await admin.close()
    finally:
        await bus.close()


async def test_a_nacked_publication_is_not_overtaken_by_a_later_one_of_its_partition(
    namespace, amqp_url, caplog
):
    """A queue refuses one publication (nacked) and takes the next one of the same key,
    written before the nack came back: the key's events still reach it in publish order.

    The queue is bounded in bytes with reject-publish, and holds a filler: a batch of a
    mint's trades does not fit beside it, the mint's migration after it does. The
    filler is taken once the batch was nacked, so the batch fits when written again.
    """
    from pumpflow.common.bus.batches import batch_body
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.bus.routing import routing_key_for
    from pumpflow.common.events import TokenMigrated, encode_event

    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="feed/r1")
    await bus.start()
    try:
        trades = [trade_event("mintA", seq) for seq in range(1, 11)]
        migration = make_event(
            TokenMigrated(signature="sig-migrate", mint="mintA", txType="migrate"),
            source="feed/r1",
            time=time.time(),
            seq=11,
        )
        batch = len(batch_body([encode_event(e) for e in trades]))
        alone = len(encode_event(migration))
        assert batch > 4 * alone
        limit = batch + alone
        channel = bus._channel
        queue = await channel.declare_queue(
            f"{namespace}.bounded",
            arguments={"x-max-length-bytes": limit, "x-overflow": "reject-publish"},
        )
        for event in (trades[0], migration):
            await queue.bind(bus.exchange_name, routing_key=routing_key_for(event, 1))
        filler = b"x" * (limit - 2 * alone)
        await channel.default_exchange.publish(aio_pika.Message(filler), routing_key=queue.name)

        def nacks() -> int:
            return sum("DeliveryError" in r.getMessage() for r in caplog.records)

        caplog.set_level("WARNING", logger="pumpflow.common.bus.rabbitmq")
        publishing = asyncio.ensure_future(bus.publish_many([*trades, migration]))
        await eventually(lambda: nacks() >= 1, within=10, what="the batch nacked")
        taken = await queue.get(timeout=5)
        assert taken.body == filler
        await taken.ack()
        await asyncio.wait_for(publishing, 20)
        arrived: list[int] = []
        while (message := await queue.get(timeout=5, fail=False)) is not None:
            await message.ack()
            body = message.body
            events = batch_parts(body) or [body]
            arrived += [decode_event(part).seq for part in events]
        assert arrived == list(range(1, 12))
    finally:
        await bus.close()


async def test_a_publication_given_up_fails_the_later_ones_of_its_partition(
    namespace, amqp_url, monkeypatch
):
    """The first of a key's publications is nacked until it gives up: the one behind it
    was never written, and fails with it; published again, both arrive in order."""
    from pumpflow.common.bus import rabbitmq
    from pumpflow.common.bus.rabbitmq import PublishAbandoned, RabbitMQBus
    from pumpflow.common.bus.routing import routing_key_for
    from pumpflow.common.events import TokenMigrated

    monkeypatch.setattr(rabbitmq, "NACKED_ATTEMPTS", 2)
    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=1, source="feed/r1")
    await bus.start()
    try:
        trade = trade_event("mintA", 1)
        migration = make_event(
            TokenMigrated(signature="sig-migrate", mint="mintA", txType="migrate"),
            source="feed/r1",
            time=time.time(),
            seq=2,
        )
        channel = bus._channel
        queue = await channel.declare_queue(
            f"{namespace}.full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        for event in (trade, migration):
            await queue.bind(bus.exchange_name, routing_key=routing_key_for(event, 1))
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=queue.name)
        with pytest.raises((PublishAbandoned, aiormq.exceptions.DeliveryError)):
            await bus.publish_many([trade, migration])
        assert bus._lines == {}
        taken = await queue.get(timeout=5)
        assert taken.body == b"filler"
        await taken.ack()
        await queue.delete(if_unused=False, if_empty=False)
        queue = await channel.declare_queue(f"{namespace}.open")
        for event in (trade, migration):
            await queue.bind(bus.exchange_name, routing_key=routing_key_for(event, 1))
        await bus.publish_many([trade, migration])
        arrived = []
        while (message := await queue.get(timeout=5, fail=False)) is not None:
            await message.ack()
            arrived.append(decode_event(message.body).seq)
        assert arrived == [1, 2]
    finally:
        await bus.close()
