"""Fixtures shared by every test: real services, unique names per run."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

AMQP_URL = os.environ.get("PUMPFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PUMPFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("PUMPFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def namespace() -> str:
    """A name no other test or run uses: prefix of exchanges, queues, keys, schemas."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The broker, in a virtual host of this test session's own, deleted at the end.

    Deleting the vhost removes every exchange and queue the session declared, also
    those of a test that was interrupted before its own cleanup. Where rabbitmqctl
    is not at hand (a remote broker) the configured URL is used as it is.
    """
    vhost = f"pumpflow-test-{uuid.uuid4().hex[:10]}"
    ctl = shutil.which("rabbitmqctl")
    created = False
    if ctl and os.environ.get("PUMPFLOW_TEST_AMQP_URL") is None:
        created = (
            subprocess.run([ctl, "add_vhost", vhost], capture_output=True, timeout=60).returncode
            == 0
            and subprocess.run(
                [ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                capture_output=True,
                timeout=60,
            ).returncode
            == 0
        )
    try:
        yield f"{AMQP_URL.rstrip('/')}/{vhost}" if created else AMQP_URL
    finally:
        if created:
            subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def pg_pool(namespace):
    """A pool on a fresh, migrated schema, dropped afterwards."""
    import asyncpg

    from pumpflow.common.db.pool import create_pool

    pool = await create_pool(POSTGRES_DSN, namespace)
    try:
        yield pool
    finally:
        await pool.close()
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def redis_client(namespace):
    """A Redis client; every key the test wrote under the namespace is deleted after."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


#: fixtures that always connect: a test using one needs that server, marked or not
#: (the URL fixtures are left out: a transport-parametrized test asks for them in its
#: in-memory run too)
SERVER_FIXTURES = {"redis_client": "redis", "pg_pool": "postgres"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if asyncio.iscoroutinefunction(getattr(item, "function", None)):
            item.add_marker(pytest.mark.timeout(120))
        # so that -m "not postgres" (and the like) never runs a test that needs the server
        for fixture in SERVER_FIXTURES.keys() & set(item.fixturenames):
            if item.get_closest_marker(SERVER_FIXTURES[fixture]) is None:
                item.add_marker(SERVER_FIXTURES[fixture])
