"""A service needing RabbitMQ, Redis and Postgres: run as a process by test_startup.py.

Usage: python needy_service.py
"""

from __future__ import annotations

import asyncio
import sys

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.events import Event
from pumpflow.common.runtime.runner import run_service
from pumpflow.common.runtime.service import Service, ServiceContext


class NeedyService(Service):
    name = "needy"
    needs_store = True
    needs_db = True

    async def start(self, ctx: ServiceContext) -> None:
        await ctx.bus.subscribe(
            Subscription(service=self.name, patterns=("token.lifecycle",), handler=self.handle)
        )

    async def handle(self, event: Event) -> None:
        return None

    async def stop(self) -> None:
        return None


if __name__ == "__main__":
    sys.exit(asyncio.run(run_service(NeedyService)))
