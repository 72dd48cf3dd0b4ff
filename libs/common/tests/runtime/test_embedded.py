from __future__ import annotations

import logging

import pytest

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event, SystemShutdown, TokenLifecycle, make_event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings

JOURNAL: list[str] = []


class Counter(Service):
    name = "counter"

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.seen: list[tuple[str, str | None]] = []
        await ctx.bus.subscribe(
            Subscription(service=self.name, patterns=("token.*", "system.*"), handler=self.handle)
        )
        JOURNAL.append(f"start {self.name}")

    async def handle(self, event: Event) -> None:
        self.seen.append((event.type, event.key))
        if event.type == "token.lifecycle":
            await self.ctx.store.set(f"last:{event.key}", event.data.state.encode())

    def stopping(self) -> None:
        JOURNAL.append(f"stopping {self.name}")

    async def stop(self) -> None:
        JOURNAL.append(f"stop {self.name}")


class Announcer(Service):
    """Publishes a lifecycle event per mint on start and a shutdown notice on stop."""

    name = "announcer"

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        for mint in ("m1", "m2", "m3"):
            payload = TokenLifecycle(mint=mint, state="active")
            await ctx.bus.publish(make_event(payload, source=ctx.source, time=ctx.clock.now()))
        JOURNAL.append(f"start {self.name}")

    async def stop(self) -> None:
        payload = SystemShutdown(reason="test over")
        await self.ctx.bus.publish(
            make_event(payload, source=self.ctx.source, time=self.ctx.clock.now())
        )
        JOURNAL.append(f"stop {self.name}")


@pytest.fixture(autouse=True)
def clear_journal():
    JOURNAL.clear()


@pytest.mark.parametrize("synchronous", [True, False])
async def test_services_share_bus_store_and_clock_and_stop_in_reverse(synchronous):
    clock = ReplayClock(start=1000.0)
    async with run_embedded(
        [Counter, Announcer], clock=clock, partitions=4, synchronous=synchronous
    ) as system:
        await system.drain()
        counter = system["counter"]
        assert sorted(counter.seen) == [("token.lifecycle", m) for m in ("m1", "m2", "m3")]
        assert await system.store.get("last:m2") == b"active"
        assert system.contexts["announcer"].source.startswith("announcer/")
        assert system.contexts["counter"].settings.transport == "memory"
        assert system.contexts["counter"].settings.partitions == 4
        assert system.contexts["counter"].clock is clock
        assert system.contexts["counter"].store is system.contexts["announcer"].store
    # as the distributed runtime: what stopping leaves is noted before any service stops
    assert JOURNAL == [
        "start counter",
        "start announcer",
        "stopping counter",
        "stop announcer",
        "stop counter",
    ]
    # the announcer's shutdown notice, published while stopping, reached the counter
    assert counter.seen[-1] == ("system.shutdown", None)


async def test_instances_keep_their_settings():
    counter = Counter(CommonSettings(service="counter", replica="fixed", transport="memory"))
    async with run_embedded([counter], clock=ReplayClock(), synchronous=True) as system:
        assert system["counter"] is counter
        assert system.contexts["counter"].source == "counter/fixed"


async def test_two_services_with_one_name_are_refused():
    with pytest.raises(ValueError, match="its own name"):
        async with run_embedded([Counter, Counter], clock=ReplayClock()):
            pass


async def test_a_failing_start_stops_the_ones_already_started():
    class Broken(Service):
        name = "broken"

        async def start(self, ctx: ServiceContext) -> None:
            raise RuntimeError("cannot start")

        async def stop(self) -> None:
            JOURNAL.append("stop broken")

    with pytest.raises(RuntimeError, match="cannot start"):
        async with run_embedded([Counter, Broken], clock=ReplayClock()):
            pass
    assert JOURNAL == ["start counter", "stopping counter", "stop counter"]


class Leaving(Counter):
    """A counter that stops consuming as it stops, as the services do."""

    name = "leaving"

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.seen = []
        self.subscription = Subscription(
            service=self.name, patterns=("token.*",), handler=self.handle
        )
        await ctx.bus.subscribe(self.subscription)

    async def stop(self) -> None:
        await self.ctx.bus.unsubscribe(self.subscription)


class LateAnnouncer(Announcer):
    """Publishes a token's lifecycle as it stops, after the services behind it stopped (a
    paper fill that comes due then, say)."""

    name = "late"

    async def stop(self) -> None:
        payload = TokenLifecycle(mint="m9", state="inactive")
        await self.ctx.bus.publish(
            make_event(payload, source=self.ctx.source, time=self.ctx.clock.now())
        )
        JOURNAL.append(f"stop {self.name}")


async def test_what_comes_for_a_service_stopped_for_good_is_dropped_and_said(caplog):
    """The stop of the run drains the bus after each service: an event for one stopped
    before would wait for nobody, each drain to its timeout, silently. The stopped one's
    group is unbound as it stops (a line says so): the event goes nowhere, and no drain
    times out."""
    caplog.set_level(logging.DEBUG, logger="pumpflow.embedded")
    async with run_embedded([LateAnnouncer, Leaving], clock=ReplayClock(), partitions=4) as system:
        await system.drain()
    assert JOURNAL == ["start late", "stopping leaving", "stop late"]
    assert system.bus.describe()["pending"] == 0
    said = [r.getMessage() for r in caplog.records]
    assert "embedded: after leaving stopped, nothing consumes leaving any more: what comes " \
        "for it is dropped" in said, said  # fmt: skip
    assert not [line for line in said if "still in flight" in line], said


async def test_what_waits_for_a_service_stopped_before_the_end_is_dropped_saying_what(caplog):
    caplog.set_level(logging.INFO, logger="pumpflow.embedded")
    clock = ReplayClock()
    async with run_embedded([Leaving], clock=clock, partitions=4) as system:
        await system["leaving"].stop()
        payload = TokenLifecycle(mint="m1", state="inactive")
        await system.bus.publish(make_event(payload, source="test", time=clock.now()))
        assert system.bus.describe()["pending"] == 1
    assert system.bus.describe()["pending"] == 0
    said = [r.getMessage() for r in caplog.records]
    assert "embedded: before the services stop, 1 event for leaving (stopped) dropped: " \
        "token.lifecycle 1" in said, said  # fmt: skip
    assert not [line for line in said if "still in flight" in line], said
