"""Fixtures of the fault suite: pipelines of processes on the servers a scenario faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from pumpflow.common.testing import drop_schema, stack_env
from pumpflow.common.testing.faults import Ledger, MarketOptions, Pipeline, Servers
from pumpflow.common.testing.instances import PostgresInstance, RabbitMQInstance, RedisInstance
from pumpflow.common.testing.proxy import TcpProxy
from pumpflow.common.testing.stack import ProcessStack

INSTANCES = {"rabbitmq": RabbitMQInstance, "redis": RedisInstance, "postgres": PostgresInstance}
#: a JSONL file each scenario's figures are appended to (docs/reliability.md's tables)
REPORT = os.environ.get("PUMPFLOW_FAULT_REPORT")


@pytest_asyncio.fixture
async def make_pipeline(request, tmp_path, namespace, amqp_url, redis_url, postgres_dsn):
    """``await make_pipeline(own=("redis",), market=MarketOptions(...), **settings)``.

    The servers named in ``own`` are the test's own (to restart, stop, kill); the others
    are the shared ones, left alone. The services reach those named in ``proxied``
    through a :class:`TcpProxy` of the test's own (to freeze). Everything is removed
    after the test.
    """
    made: list[tuple[Pipeline, dict]] = []
    proxies: list[TcpProxy] = []

    async def make(*, own=(), proxied=(), market=MarketOptions(), **settings) -> Pipeline:
        instances = {}
        try:
            for name in own:
                instances[name] = INSTANCES[name]()
                await asyncio.to_thread(instances[name].start)
        except BaseException:
            for instance in instances.values():
                await asyncio.to_thread(instance.close)
            raise
        urls = {
            "rabbitmq": instances["rabbitmq"].url if "rabbitmq" in instances else amqp_url,
            "redis": instances["redis"].url if "redis" in instances else redis_url,
            "postgres": instances["postgres"].dsn if "postgres" in instances else postgres_dsn,
        }
        fronted = {}
        for name in proxied:
            proxy = TcpProxy(urlsplit(urls[name]).port)
            await proxy.start()
            proxies.append(proxy)
            fronted[name] = proxy
            urls[name] = proxy.url(urls[name])
        servers = Servers(
            amqp_url=urls["rabbitmq"], redis_url=urls["redis"], postgres_dsn=urls["postgres"]
        )
        from pumpflow.common.db.pool import create_pool

        pool = await create_pool(servers.postgres_dsn, namespace)  # the schema, migrated
        await pool.close()
        env = stack_env(
            namespace=namespace,
            amqp_url=servers.amqp_url,
            redis_url=servers.redis_url,
            postgres_dsn=servers.postgres_dsn,
        )
        stack = ProcessStack(env, tmp_path)
        pipeline = Pipeline(stack, servers=servers, namespace=namespace, market=market, **settings)
        pipeline.instances = instances
        pipeline.proxies = fronted
        made.append((pipeline, instances))
        return pipeline

    yield make
    for pipeline, instances in made:
        await pipeline.aclose()
        for name in ("rabbitmq",):
            if name not in instances:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pipeline.stack.aclose(), 30)
        for instance in instances.values():
            await asyncio.to_thread(instance.close)
        if "postgres" not in instances:
            await drop_schema(postgres_dsn, namespace)
        if "redis" not in instances:
            import redis.asyncio as redis

            client = redis.Redis.from_url(redis_url)
            keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    for proxy in proxies:
        await proxy.close()


@pytest.fixture
def report(request):
    """``report(ledger)``: print a scenario's figures, appended to PUMPFLOW_FAULT_REPORT."""

    def write(ledger: Ledger) -> None:
        _write(request.node.name, ledger)

    return write


def _write(name: str, ledger: Ledger) -> None:
    line = json.dumps({"scenario": name, **ledger.figures()}, sort_keys=True)
    print(line)
    if REPORT:
        with Path(REPORT).open("a") as out:
            out.write(line + "\n")
