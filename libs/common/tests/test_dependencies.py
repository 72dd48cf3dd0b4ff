"""The one classification of transient dependency failures, and waiting them out."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys

import aio_pika
import aiormq.exceptions
import asyncpg
import pytest
import redis
import redis.exceptions
from redis import asyncio as aioredis

from pumpflow.common import dependencies
from pumpflow.common.dependencies import (
    NETWORK,
    POSTGRES,
    RABBITMQ,
    REDIS,
    WAITS,
    Backoff,
    transient_dependency,
    wait_out,
)
from pumpflow.common.events import EventValidationError
from pumpflow.common.testing import eventually, free_port
from pumpflow.common.workers import TaskHung


async def _failure(action) -> BaseException:
    try:
        await action
    except Exception as exc:
        return exc
    raise AssertionError("expected a failure")


async def test_what_a_dependency_that_is_away_raises_is_transient_and_named():
    closed = free_port()
    client = aioredis.Redis(host="127.0.0.1", port=closed)
    try:
        assert transient_dependency(await _failure(client.get("k"))) == REDIS
    finally:
        await client.aclose()
    refused = await _failure(asyncpg.connect(host="127.0.0.1", port=closed, user="postgres"))
    assert transient_dependency(refused) in (POSTGRES, NETWORK)
    amqp = await _failure(aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{closed}/"))
    assert transient_dependency(amqp) == RABBITMQ


@pytest.mark.parametrize(
    ("error", "dependency"),
    [
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), REDIS),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), REDIS),
        (redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"), REDIS),
        (redis.exceptions.ReadOnlyError("READONLY You can't write against a replica"), REDIS),
        (
            redis.exceptions.OutOfMemoryError(
                "OOM command not allowed when used memory > 'maxmemory'."
            ),
            REDIS,
        ),
        # a script's write refused at maxmemory, as redis-py raises it
        (redis.exceptions.OutOfMemoryError("server:OutOfMemoryError"), REDIS),
        (
            redis.exceptions.ResponseError(
                "MISCONF Redis is configured to save RDB snapshots, but it's currently "
                "unable to persist to disk."
            ),
            REDIS,
        ),
        (asyncpg.exceptions.DiskFullError("could not extend file: No space left"), POSTGRES),
        (asyncpg.exceptions.OutOfMemoryError("out of memory"), POSTGRES),
        (
            asyncpg.exceptions.ReadOnlySQLTransactionError(
                "cannot execute INSERT in a read-only transaction"
            ),
            POSTGRES,
        ),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), POSTGRES),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), POSTGRES),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), POSTGRES),
        (aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"), RABBITMQ),
        (aiormq.exceptions.ChannelInvalidStateError("channel closed"), RABBITMQ),
        (ConnectionResetError(104, "Connection reset by peer"), NETWORK),
        (TimeoutError(), NETWORK),
        # what asyncpg raises when a stopped container's name no longer resolves
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), NETWORK),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), NETWORK),
    ],
)
def test_server_restarting_loading_or_dropping_connections_is_transient(error, dependency):
    assert transient_dependency(error) == dependency


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        EventValidationError("tokenAmount must be >= 0", field="tokenAmount"),
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        asyncpg.exceptions.ProgramLimitExceededError("index row requires 10024 bytes"),
        aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no queue"),
        TaskHung("task of m ran past 10s"),
        OverflowError("math range error"),
        socket.gaierror(socket.EAI_SERVICE, "Servname not supported for ai_socktype"),
    ],
)
def test_a_failure_of_the_work_itself_is_not_transient(error):
    assert transient_dependency(error) is None


def test_a_wrapper_of_a_transient_failure_is_transient():
    try:
        try:
            raise redis.exceptions.ConnectionError("Connection refused")
        except redis.exceptions.ConnectionError as exc:
            raise RuntimeError("storing failed") from exc
    except RuntimeError as wrapped:
        assert transient_dependency(wrapped) == REDIS


async def test_a_connection_failure_reached_through_a_known_dependency_is_named_as_its():
    """asyncpg raises the socket's own error when Postgres is down: named "network",
    unless the caller says where it connected."""
    closed = free_port()
    with pytest.raises(Exception) as refused:
        with dependencies.reaching(POSTGRES):
            await asyncpg.connect(host="127.0.0.1", port=closed, user="postgres")
    assert transient_dependency(refused.value) == POSTGRES
    # named ones keep their name, and the work's own failures stay the work's
    with pytest.raises(redis.exceptions.TimeoutError) as timed_out:
        with dependencies.reaching(POSTGRES):
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
    assert transient_dependency(timed_out.value) == REDIS
    with pytest.raises(ValueError) as bad:
        with dependencies.reaching(POSTGRES):
            raise ValueError("bad input")
    assert transient_dependency(bad.value) is None


async def test_wait_out_waits_through_transient_failures_and_raises_the_others():
    failures = [redis.exceptions.ConnectionError("refused")] * 3
    seen_waiting: list[dict] = []

    async def flaky() -> str:
        if failures:
            raise failures.pop()
        return "done"

    def after_pause() -> None:
        seen_waiting.append(WAITS.describe())

    backoff = Backoff(initial_s=0.001, max_s=0.002)
    result = await wait_out(flaky, waiter="test", backoff=backoff, after_pause=after_pause)
    assert result == "done"
    assert len(seen_waiting) == 3 and all(REDIS in w for w in seen_waiting)
    assert REDIS not in WAITS.describe()

    async def broken() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError):
        await wait_out(broken, waiter="test", backoff=backoff)

    attempts = []

    async def broken_twice() -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise ValueError("not yet")
        return len(attempts)

    assert await wait_out(broken_twice, waiter="test", backoff=backoff, retry_failures=True) == 3


async def test_work_that_keeps_failing_logs_its_first_failure_then_a_line_a_while(
    monkeypatch, caplog
):
    """Retried whatever the error, a lasting failure (a key of the wrong kind) is logged
    at once, then once per FAILURE_LOG_EVERY_S with how many tries failed, not per try."""
    monkeypatch.setattr(dependencies, "FAILURE_LOG_EVERY_S", 0.2)
    caplog.set_level("WARNING", logger="pumpflow.common.dependencies")
    attempts = []

    async def refused() -> int:
        attempts.append(1)
        if len(attempts) <= 60:
            raise ValueError("the key holds a set")
        return len(attempts)

    backoff = Backoff(initial_s=0.01, max_s=0.01)
    started = asyncio.get_running_loop().time()
    assert await wait_out(refused, waiter="t", what="storing", backoff=backoff,
                          retry_failures=True) == 61  # fmt: skip
    took = asyncio.get_running_loop().time() - started
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert lines[0] == "t: storing failed, retrying: ValueError('the key holds a set')"
    assert all(
        re.match(r"t: storing still fails \(\d+ tries in \d+ s\)", line) for line in lines[1:]
    )
    # one line at once and one a 0.2 s since, not one per try
    assert 2 <= len(lines) <= 2 + took / 0.2, (lines, took)
    assert caplog.records[-1].getMessage().startswith("t: storing went through after")


async def test_cancelling_a_wait_ends_it():
    async def away() -> None:
        raise redis.exceptions.ConnectionError("refused")

    task = asyncio.ensure_future(wait_out(away, waiter="test"))
    await eventually(lambda: REDIS in WAITS.describe(), what="the wait is recorded")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert REDIS not in WAITS.describe()


def test_a_process_exports_no_waiting_on_each_dependency_from_the_start():
    """A fresh process that never waited shows 0 for Redis, Postgres and RabbitMQ (a
    dashboard reads 0, not No data)."""
    exported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pumpflow.common.dependencies, prometheus_client; "
            "print(prometheus_client.generate_latest().decode())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for dependency in ("redis", "postgres", "rabbitmq"):
        assert f'pumpflow_dependency_waiting{{dependency="{dependency}"}} 0.0' in exported
