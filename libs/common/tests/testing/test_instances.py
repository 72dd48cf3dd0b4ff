"""The servers of a test's own start on their own ports, stop, restart and keep what they should."""

from __future__ import annotations

import aio_pika
import asyncpg
import pytest
from redis.asyncio import Redis

from pumpflow.common.testing.instances import (
    RabbitMQInstance,
    RedisInstance,
)


async def test_redis_restart_empties_it_unless_persistent():
    for persistent, kept in ((False, None), (True, b"1")):
        with RedisInstance(persistent=persistent) as server:
            assert server.port != 6379
            before = Redis.from_url(server.url)
            await before.set("k", "1")
            await before.aclose()
            server.restart()
            after = Redis.from_url(server.url)
            try:
                assert await after.get("k") == kept
            finally:
                await after.aclose()


async def test_redis_pause_leaves_clients_waiting_until_resumed():
    with RedisInstance() as server:
        client = Redis.from_url(server.url, socket_timeout=0.3)
        try:
            server.pause()
            with pytest.raises(Exception, match="Timeout"):
                await client.ping()
            server.resume()
            assert await Redis.from_url(server.url).ping()
        finally:
            await client.aclose()


async def test_postgres_keeps_its_data_across_a_restart_and_a_kill(own_postgres):
    server = own_postgres
    assert server.port != 5432
    conn = await asyncpg.connect(server.dsn)
    await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
    await conn.close()
    server.restart()
    server.kill()
    assert not server.running
    server.start()
    conn = await asyncpg.connect(server.dsn)
    try:
        assert await conn.fetchval("SELECT n FROM kept") == 7
    finally:
        await conn.close()


async def test_rabbitmq_keeps_persistent_messages_of_durable_queues_across_a_restart():
    with RabbitMQInstance() as server:
        assert server.port != 5672
        connection = await aio_pika.connect(server.url)
        channel = await connection.channel()
        queue = await channel.declare_queue("kept", durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"m", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        await connection.close()
        server.restart()
        connection = await aio_pika.connect(server.url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue("kept", durable=True)
            message = await queue.get(timeout=5)
            assert message.body == b"m"
        finally:
            await connection.close()
        assert server.ctl("list_queues").returncode == 0


def test_a_server_that_cannot_start_says_why():
    from pumpflow.common.testing.instances import InstanceError

    with RedisInstance() as first:
        second = RedisInstance(port=first.port)
        with pytest.raises(InstanceError, match="something else listens there"):
            second.start()
        second.close()
        assert first.running
