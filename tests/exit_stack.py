"""The exit service and trading as processes over RabbitMQ, Redis and Postgres, for the
tests that kill, restart or add exit processes in the middle of a graceful exit: the
settings they share, trading's URL, the test's upstream and a watch of the events of
orders, positions and exits."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from pumpflow.common.testing import EventCollector, ProcessStack, eventually, free_port, http_json

from .upstream import Upstream

TOKEN = "test-token"
#: a graceful exit short enough for a test, its polls and resumes quick
SETTINGS = {
    "api_token": TOKEN,
    "trading_lease_ttl_s": 3,
    "trading_max_feed_lag_s": 120,
    "consumer_groups": "trading,exit,exit-control",
    "exit_deadline_s": 40.0,
    "exit_run_poll_s": 0.2,
    "exit_resume_wait_s": 5.0,
    "exit_order_timeout_s": 10.0,
}


class ExitStack:
    """The processes, what the test publishes upstream of trading, and what it watches."""

    #: how long :meth:`until` waits by default
    within: float = 40.0

    def __init__(self, processes: ProcessStack, upstream: Upstream, watch: EventCollector):
        self.processes = processes
        self.upstream = upstream
        self.watch = watch
        self.trading_url = f"http://127.0.0.1:{free_port()}"

    def serve_trading(self) -> None:
        self.processes.serve("trading", http_port=self.trading_url.rsplit(":", 1)[1])

    async def get(self, url: str):
        return await asyncio.to_thread(http_json, url)

    async def until(self, condition, what: str, within: float | None = None) -> None:
        within = self.within if within is None else within
        await eventually(condition, within, what=what, details=self.processes.logs, interval=0.1)


S = TypeVar("S", bound=ExitStack)


async def exit_stack(
    kind: type[S],
    process_stack: ProcessStack,
    rabbitmq_harness,
    *,
    partitions: int | None = None,
    **settings: object,
) -> S:
    """A ``kind`` of stack whose processes run with :data:`SETTINGS` and ``settings``;
    ``partitions``, if given, are the processes' and the upstream bus's (4 otherwise)."""
    if partitions is not None:
        settings["partitions"] = partitions
    process_stack.configure(**SETTINGS, **settings)
    bus = await rabbitmq_harness.bus(partitions=partitions or 4, source="test/upstream")
    watch = await EventCollector("watch").attach(bus, "order.*", "position.*", "exit.*")
    return kind(process_stack, Upstream(bus), watch)
