"""Helpers of the activity service tests: token events on the real curve, and a stack.

Activity consumes ``features.updated``: the stack folds each token event a test sends
into a :class:`FeatureManager` and publishes the event and its ``features.updated``
(as the features service would, sequenced per mint) on a synchronous in-memory bus,
so activity has applied it, stored and published what follows, when ``send`` returns.
The features service itself runs in front of activity in ``test_service.py``'s
embedded test and in ``tests/test_embedded_pipeline.py``.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.activity.service import ActivityService
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.bus import Subscription
from pumpflow.common.bus.abc import EventBus
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import FeatureUpdates, TokenEvents

START = 1_700_000_000.0
PARTITIONS = 4


@pytest.fixture
def clock() -> ReplayClock:
    return ReplayClock(START)


@pytest.fixture
def tokens(clock) -> TokenEvents:
    return TokenEvents(clock)


@pytest.fixture
def token_events_class() -> type[TokenEvents]:
    """The event builder itself, for tests that bring their own clock."""
    return TokenEvents


class Stack:
    """Features and activity on one synchronous in-memory bus and store, a probe."""

    def __init__(self, clock: ReplayClock, tokens: TokenEvents, namespace: str):
        self.clock = clock
        self.tokens = tokens
        self.namespace = namespace
        self.bus = InMemoryBus(partitions=PARTITIONS, synchronous=True, source="test")
        self.store = MemoryStateStore(clock)
        self.lifecycle: list[Event] = []
        self.commands: list[Event] = []
        self.features = FeatureUpdates()

    async def start(self) -> None:
        await self.bus.start()

        async def collect(event: Event) -> None:
            (self.lifecycle if event.type == "token.lifecycle" else self.commands).append(event)

        await self.bus.subscribe(
            Subscription(
                service="probe", patterns=("token.lifecycle", "feed.subscription"), handler=collect
            )
        )

    async def activity(
        self, *, bus: EventBus | None = None, registry: CollectorRegistry | None = None, **kw
    ) -> ActivityService:
        settings = ActivitySettings.load(
            transport="memory", partitions=PARTITIONS, namespace=self.namespace,
            # flushed by the tests: the batch timer is an hour of the clock away
            **{"activity_subscription_batch_s": 3600, **kw},
        )  # fmt: skip
        svc = ActivityService(settings, registry=registry or CollectorRegistry())
        self.ctx = ServiceContext(
            settings=settings, bus=bus or self.bus, clock=self.clock, store=self.store
        )
        await svc.start(self.ctx)
        return svc

    async def at(self, offset: float) -> None:
        """Move the clock to ``START + offset``; the timers due run, stored and published."""
        await self.clock.advance_to(START + offset)

    async def send(self, event: Event) -> None:
        await self.bus.publish(event)
        update = self.features.updated(event)
        if update is not None:
            await self.bus.publish(update)

    async def pump(self, mints, start: float, end: float, step: float = 2.0) -> None:
        """Trade ``mints`` every ``step`` seconds from ``start`` to ``end``."""
        t, i = start, 0
        while t <= end:
            await self.at(t)
            for mint in mints:
                await self.send(self.tokens.trade(mint, f"w{i % 30}", buy=i % 4 != 3))
            t += step
            i += 1

    def states(self, mint: str) -> list[str]:
        return [
            e.data.state for e in self.lifecycle
            if e.key == mint and e.data.state != e.data.previous_state
        ]  # fmt: skip

    def seqs(self, mint: str) -> list[int]:
        return [e.seq for e in self.lifecycle if e.key == mint]

    async def close(self) -> None:
        await self.bus.close()


@pytest.fixture
async def stack(clock, tokens, namespace):
    s = Stack(clock, tokens, namespace)
    await s.start()
    yield s
    await s.close()
