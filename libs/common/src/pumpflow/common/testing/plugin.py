"""pytest plugin of the test kit: servers, namespaces, bus harnesses, processes.

Register it once, in the root conftest.py: ``pytest_plugins = ["pumpflow.common.testing.plugin"]``.

Fixtures: ``namespace`` (unique per test), ``amqp_url`` (a RabbitMQ vhost of the
session's own), ``redis_url``, ``postgres_dsn``, ``redis_client`` and ``pg_pool``
(cleaned up after the test), ``bus_harness`` (a :class:`BusHarness`, run once per
transport), ``rabbitmq_harness``, ``token_events``, ``process_stack``, and servers of
the test's own to stop and restart: ``own_redis``, ``own_rabbitmq`` and ``own_postgres``
(:mod:`pumpflow.common.testing.instances`). A test that
uses a fixture which always connects is marked with its server (``-m "not redis"``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator

import pytest
import pytest_asyncio

from pumpflow.common.testing.bus import MEMORY, RABBITMQ, TRANSPORTS, BusHarness
from pumpflow.common.testing.factories import TokenEvents
from pumpflow.common.testing.instances import PostgresInstance, RabbitMQInstance, RedisInstance
from pumpflow.common.testing.servers import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_schema,
    rabbitmq_vhost,
)
from pumpflow.common.testing.stack import ProcessStack, stack_env

#: fixtures that always connect: a test using one needs that server, marked or not
#: (the URL fixtures are left out: a transport-parametrized test asks for them in its
#: in-memory run too)
SERVER_FIXTURES = {"redis_client": "redis", "pg_pool": "postgres", "rabbitmq_harness": "rabbitmq"}

MARKERS = {
    "rabbitmq": "needs the RabbitMQ broker on 127.0.0.1:5672",
    "redis": "needs Redis on 127.0.0.1:6379",
    "postgres": "needs PostgreSQL on 127.0.0.1:5432",
}


def pytest_configure(config: pytest.Config) -> None:
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, description in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # so that -m "not postgres" (and the like) never runs a test that needs the server
        for fixture in SERVER_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            if item.get_closest_marker(SERVER_FIXTURES[fixture]) is None:
                item.add_marker(SERVER_FIXTURES[fixture])


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """A test that configures logging in-process (a service's runner, a CLI command)
    leaves the root logger as it found it: the handler it installed writes to that
    test's captured stderr, closed once the test ends, and a later test's log records
    would print logging's own errors into its output."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------------- servers


@pytest.fixture
def namespace() -> str:
    """A name no other test or run uses: prefix of exchanges, queues, keys, schemas."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The broker, in a virtual host of this test session's own, deleted at the end."""
    with rabbitmq_vhost() as url:
        yield url


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def postgres_dsn() -> str:
    return POSTGRES_DSN


@pytest_asyncio.fixture
async def pg_pool(namespace: str, postgres_dsn: str):
    """A pool on a fresh, migrated schema named after the namespace, dropped afterwards."""
    from pumpflow.common.db.pool import create_pool

    pool = await create_pool(postgres_dsn, namespace)
    try:
        yield pool
    finally:
        await pool.close()
        await drop_schema(postgres_dsn, namespace)


@pytest_asyncio.fixture
async def redis_client(namespace: str, redis_url: str):
    """A Redis client; every key the test wrote under the namespace is deleted after."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# ---------------------------------------------------------------------- buses


def bus_harness_fixture(
    *,
    transports: Iterable[str] = TRANSPORTS,
    partitions: int = 4,
    prefetch: int = 256,
    synchronous: bool = False,
    name: str | None = None,
):
    """A fixture yielding a started-on-demand :class:`BusHarness`, run once per transport.

    Assign it in a conftest or test module (``harness = bus_harness_fixture(partitions=8)``)
    or name it (``name=``). RabbitMQ runs are marked ``rabbitmq``; the in-memory run
    never touches the broker. ``synchronous`` applies to the in-memory bus.
    """
    params = [
        pytest.param(t, id=t, marks=[pytest.mark.rabbitmq] if t == RABBITMQ else [])
        for t in transports
    ]

    @pytest_asyncio.fixture(params=params, name=name)
    async def harness(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[BusHarness]:
        url = request.getfixturevalue("amqp_url") if request.param == RABBITMQ else None
        async with BusHarness(
            request.param,
            namespace=namespace,
            amqp_url=url,
            partitions=partitions,
            prefetch=prefetch,
            synchronous=synchronous and request.param == MEMORY,
        ) as made:
            yield made

    return harness


bus_harness = bus_harness_fixture(name="bus_harness")


@pytest_asyncio.fixture
async def rabbitmq_harness(namespace: str, amqp_url: str) -> AsyncIterator[BusHarness]:
    """A :class:`BusHarness` on RabbitMQ only (the test is marked ``rabbitmq``)."""
    async with BusHarness(RABBITMQ, namespace=namespace, amqp_url=amqp_url) as made:
        yield made


@pytest.fixture
def token_events() -> TokenEvents:
    """Token events of a fresh factory: times from 1_700_000_000 in steps of a second."""
    return TokenEvents()


# ---------------------------------------------------------------------- processes


@pytest_asyncio.fixture
async def process_stack(
    tmp_path, namespace: str, amqp_url: str, redis_url: str, postgres_dsn: str
) -> AsyncIterator[ProcessStack]:
    """Processes on the test's vhost, Redis prefix and Postgres schema (the namespace).

    Over RabbitMQ with 4 partitions; change that and more with ``configure``. Logs
    go to the test's tmp_path. Whatever still runs at the end is killed.
    """
    env = stack_env(
        namespace=namespace, amqp_url=amqp_url, redis_url=redis_url, postgres_dsn=postgres_dsn
    )
    async with ProcessStack(env, tmp_path) as stack:
        yield stack


@pytest.fixture
def own_redis() -> Iterator[RedisInstance]:
    """A Redis server of the test's own, on a free port, removed after the test."""
    with RedisInstance() as server:
        yield server


@pytest.fixture
def own_rabbitmq() -> Iterator[RabbitMQInstance]:
    """A RabbitMQ node of the test's own, on a free port, removed after the test."""
    with RabbitMQInstance() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresInstance]:
    """A PostgreSQL cluster of the test's own, on a free port, removed after the test."""
    with PostgresInstance() as server:
        yield server
