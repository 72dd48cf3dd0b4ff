"""A service whose handler takes a while: run as a process by test_runner.py.

Usage: python slow_service.py <journal file>
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.events import Event, TokenLifecycle, make_event
from pumpflow.common.runtime.runner import run_service
from pumpflow.common.runtime.service import Service, ServiceContext

JOURNAL = Path(sys.argv[1])
HANDLER_SECONDS = 1.0


def note(line: str) -> None:
    with JOURNAL.open("a") as out:
        out.write(line + "\n")


class SlowService(Service):
    name = "slowpoke"

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        await ctx.bus.subscribe(
            Subscription(service=self.name, patterns=("token.lifecycle",), handler=self.handle)
        )
        payload = TokenLifecycle(mint="m1", state="active")
        await ctx.bus.publish(make_event(payload, source=ctx.source, time=ctx.clock.now()))

    async def handle(self, event: Event) -> None:
        note(f"handler started {event.key}")
        await asyncio.sleep(HANDLER_SECONDS)
        note(f"handler completed {event.key}")

    async def stop(self) -> None:
        note("service stopped")


if __name__ == "__main__":
    sys.exit(asyncio.run(run_service(SlowService)))
