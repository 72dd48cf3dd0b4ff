"""The embedded system and the distributed stack take the same decisions on one stream.

A simulated market (seed 6 at 120 launches a minute, 25 s: about 470 token events)
goes through features, activity, model, trading (paper) and exit twice: embedded (one
process, the in-memory bus and store, a ReplayClock), and as five ``pumpflow serve``
processes over RabbitMQ, Redis and Postgres (trading's ledger, the exit records), each
on a replay clock of its own (``PUMPFLOW_REPLAY_CLOCK_START``, moved by
``POST /clock``). Compared: every order requested, filled or rejected and every exit
order of every token, all their fields (sizes, prices, fees, rules, reasons), in order
per token; and trading's book at the end (capital, realised PnL, fees, positions, and
why the predictions that ordered nothing did not). Ids are compared by what they name:
an order's id derives from its prediction's random event id, so each token's ids are
numbered in order of appearance. Trading's limits are the shipped ones (a lower entry
score): decisions across tokens (capital, exposure, breakers) must agree too.

Lock-step: one loop (:func:`drive`) drives both runs. The next thing to happen is the
earliest of the stream's next event and every service's next timer; a timer's time is
reached by moving every clock there (the due timers fire, their effects published
before the clock answers), an event's by moving every clock to its time and then
publishing it. After each step the driver waits until the system is quiescent:
embedded, the bus drained; distributed, every consumer group has consumed (or
dead-lettered) each event type it takes as often as the processes and the test
published it, read from every process's ``GET /clock`` (its bus counters) twice in a
row unchanged. Counters only grow, so two equal rounds hold at one instant; a handler
counts its event consumed after what it caused is published, so a balanced instant
has nothing in flight. Timers then fire at the same market times in the same order in
both runs, paper fills happen at the same market times, and nothing depends on the
wall clock or the machine's speed.

One race is ordered by the driver: a token event's ``features.updated`` goes to
activity and the model at once, and the ``token.lifecycle`` of one and the
``model.prediction`` of the other race to trading, whose entry takes the lifecycle's
priority (its size) and state. Free-running, the two runs differ there (an entry
sized at priority 3 in one and 4 in the other, and every later size through the
capital); in a live deployment either order is a valid decision. So the model's
deliveries are held (``POST /clock {"hold": true}``) while the other groups take
each event of the stream, and released once they caught up: a prediction always
meets the lifecycle of its own features, in both runs. Every other pair of events a
service takes within one step is ordered by cause (a partition is FIFO and a
consequence is published after its cause arrived), or the two come from services
that run side by side in both runs (exit takes trading's fill and activity's
lifecycle of one trade in either order) and the decisions did not depend on it: if
they ever do, this test fails.

The embedded run uses the queued bus drained after every step, not the synchronous
one: that delivers depth-first, so trading would decide on a prediction before it
took the trade and the features that led to it, an order no distributed stack takes.
Timers due at the same instant in two processes fire together distributed and one by
one embedded; none coincide in this stream.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.activity.service import ActivityService
from pumpflow.common.bus import dispatch
from pumpflow.common.bus.metrics import BUS_METRICS
from pumpflow.common.bus.routing import topic_matches
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.embedded import EmbeddedSystem, run_embedded
from pumpflow.common.runtime.topology import CONSUMER_GROUPS
from pumpflow.common.testing import EventCollector, ProcessStack, eventually, free_port, http_json
from pumpflow.exit.service import ExitService
from pumpflow.features.service import FeaturesService
from pumpflow.model.service import ModelService
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig
from pumpflow.trading.service import TradingService

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

PARTITIONS = 4
#: 2023-11-14T22:13:20Z: the stream's first second, and both runs' clocks' start
START = 1_700_000_000.0
STREAM_S = 25.0
#: market seconds the clocks run on after the last event (time rules, due fills)
TAIL_S = 20.0
#: settings of both runs, by service: entries the shipped model's scores reach
SETTINGS: dict[str, dict[str, Any]] = {
    "trading": {
        "trading_min_score": 0.3,
        "trading_reject_creator_sold": False,
        "trading_add_to_positions": True,
    },
    "exit": {"exit_max_hold_s": 15.0},
}
SERVICES = (FeaturesService, ActivityService, ModelService, TradingService, ExitService)
#: what is compared
DECISIONS = ("order.requested", "order.filled", "order.rejected", "exit.order")
TOKEN = "parity"
#: the test's consumer group of the distributed decisions
WATCHER = "parity-watch"
#: the group held while the others take a step's events
HELD = "model"


def market_stream() -> list[Event]:
    market = Market(MarketConfig(seed=6, launches_per_minute=120))
    return list(market_events(market, STREAM_S, start_epoch=START, source="feed/sim"))


def per_token(events: Sequence[Event]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """mint -> its decisions in order, each (type, payload fields), ids numbered per mint."""
    by_mint: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    labels: dict[str, dict[str, str]] = defaultdict(dict)
    for event in events:
        fields = msgspec.to_builtins(event.data)
        known = labels[fields["mint"]]
        for name in ("position_id", "order_id"):
            raw = fields.get(name)
            if raw is None:
                continue
            text = raw
            for found, label in known.items():
                text = text.replace(found, label)
            if text == raw:  # an id not seen before (an exit order's embeds its position's)
                text = known[raw] = f"{name[0]}{len(known)}"
            fields[name] = text
        by_mint[fields["mint"]].append((event.type, fields))
    return dict(by_mint)


async def drive(system, stream: Sequence[Event]) -> None:
    """Feed ``stream`` to ``system`` in lock-step with every service's timers."""
    due = await system.settle()
    for event in stream:
        while due is not None and due <= event.time:
            due = await system.advance(due)
        # the model takes the step's features once the lifecycle they led to is out
        await system.advance(event.time, hold=HELD)
        await system.publish(event)
        due = await system.release(HELD)
    end = stream[-1].time + TAIL_S
    while due is not None and due <= end:
        due = await system.advance(due)
    await system.advance(end)


def caught_up(
    rows: Sequence[dict[str, Any]],
    groups: dict[str, tuple[str, ...]],
    *,
    sent: Counter[str] | None = None,
    held: str | None = None,
) -> bool:
    """Whether every group but ``held`` consumed (or dead-lettered) each type it takes
    as often as it was published, by the bus counters' ``rows`` and the ``sent``."""
    published = Counter(sent or {})
    consumed: Counter[tuple[str, str]] = Counter()
    for row in rows:
        published[row["type"]] += row["published"]
        consumed[row["service"], row["type"]] += row["consumed"] + row["dead_lettered"]
    return all(
        consumed[group, kind] == count
        for kind, count in published.items()
        for group, patterns in groups.items()
        if group != held and any(topic_matches(p, kind) for p in patterns)
    )


def since(rows: Sequence[dict[str, Any]], before: Sequence[dict[str, Any]]):
    """The bus counters' ``rows`` less what they were ``before``: the counters are the
    process's, and earlier tests in it published and consumed too."""
    base = {(r["service"], r["type"], r["lane"]): r for r in before}
    counts = ("published", "consumed", "dead_lettered")
    return [
        {**r, **{k: r[k] - base.get((r["service"], r["type"], r["lane"]), {}).get(k, 0)
                 for k in counts}}
        for r in rows
    ]  # fmt: skip


class Embedded:
    """The embedded run, stepped: the clock moved or an event published, then drained."""

    def __init__(self, system: EmbeddedSystem, clock: ReplayClock, groups):
        self.system, self.clock, self.groups = system, clock, groups
        self.held: str | None = None
        self.before = BUS_METRICS.counts()

    async def settle(self) -> float | None:
        if self.held is None:
            assert await self.system.drain(60.0), "the embedded bus did not drain"
        else:
            # the held group's deliveries wait: every other group has caught up
            names = {"embedded", *self.groups}
            await eventually(
                lambda: caught_up(
                    [r for r in since(BUS_METRICS.counts(), self.before) if r["service"] in names],
                    self.groups,
                    held=self.held,
                ),
                60,
                what="the embedded groups caught up",
                interval=0.0005,
            )
        return self.clock.next_timer_at()

    async def advance(self, to: float, *, hold: str | None = None) -> float | None:
        if hold is not None:
            dispatch.hold(hold)
            self.held = hold
        await self.clock.advance_to(to)
        return await self.settle()

    async def release(self, group: str) -> float | None:
        dispatch.release(group)
        self.held = None
        return await self.settle()

    async def publish(self, event: Event) -> float | None:
        await self.system.bus.publish(event)
        return await self.settle()


async def embedded_run(stream: Sequence[Event]) -> tuple[list[Event], dict[str, Any]]:
    """The decisions of the embedded run, in order, and trading's PnL view at the end."""
    clock = ReplayClock(START)
    services = [
        cls(
            cls.settings_class.load(
                service=cls.name,
                transport="memory",
                partitions=PARTITIONS,
                **SETTINGS.get(cls.name, {}),
            ),
            registry=CollectorRegistry(),
        )
        for cls in SERVICES
    ]
    async with run_embedded(services, clock=clock, partitions=PARTITIONS) as system:
        decisions = await EventCollector("decisions").attach(system.bus, *DECISIONS)
        groups = {**CONSUMER_GROUPS, "decisions": DECISIONS}
        try:
            await drive(Embedded(system, clock, groups), stream)
        finally:
            dispatch.release(HELD)  # a hold is process-wide: never left to later tests
        pnl = system["trading"].pnl()
    return decisions.events, pnl


class Distributed:
    """The processes, stepped: every clock moved (``POST /clock``) or an event
    published, then awaited until every group consumed everything published."""

    def __init__(self, stack: ProcessStack, ports: dict[str, int], bus):
        self.stack, self.ports, self.bus = stack, ports, bus
        self.apis = {name: Http(port) for name, port in ports.items()}
        self.sent: Counter[str] = Counter()
        self.groups = {**CONSUMER_GROUPS, WATCHER: DECISIONS}
        self.held: str | None = None

    async def settle(self) -> float | None:
        last: list[Any] = []

        async def quiescent() -> list[dict[str, Any]] | None:
            asking = (api.request("GET", "/clock") for api in self.apis.values())
            answers = await asyncio.gather(*asking)
            if any(status != 200 for status, _ in answers):
                return None
            views = [view for _, view in answers]
            rows = [r for v in views for r in v["events"]]
            rows += [r for r in BUS_METRICS.counts() if r["service"] == WATCHER]
            snapshot = sorted(map(str, rows))
            steady = snapshot == last
            last[:] = snapshot
            if steady and caught_up(rows, self.groups, sent=self.sent, held=self.held):
                return views
            return None

        views = await eventually(
            quiescent, 60, what="every consumer group caught up", details=self.stack.logs
        )
        return _next_timer(views)

    async def _step(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = await self.apis[name].request("POST", "/clock", body)
        assert status == 200, f"{name}: POST /clock {status} {answer}\n{self.stack.logs()}"
        return answer

    async def advance(self, to: float, *, hold: str | None = None) -> float | None:
        if hold is not None:
            self.held = hold
        views = await asyncio.gather(*(
            self._step(name, {"to": to, "hold": True} if name == hold else {"to": to})
            for name in self.ports
        ))  # fmt: skip
        if any(view["fired"] for view in views):
            return await self.settle()
        return _next_timer(views)  # no timer fired: nothing happened since the last step

    async def release(self, group: str) -> float | None:
        await self._step(group, {"hold": False})
        self.held = None
        return await self.settle()

    async def publish(self, event: Event) -> float | None:
        await self.bus.publish(event)
        self.sent[event.type] += 1
        return await self.settle()


class Http:
    """One kept-alive HTTP/1.1 connection to a process's API: JSON both ways.

    A step asks every process once or twice; a new connection (and a thread) per
    request would cost more than the step itself.
    """

    def __init__(self, port: int):
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        for attempt in (1, 2):
            try:
                return await self._exchange(method, path, body)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                await self.close()  # the server closed an idle connection: once more
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self._streams
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        data = await reader.readexactly(length)
        return status, json.loads(data) if data else None

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def _next_timer(views: Sequence[dict[str, Any]]) -> float | None:
    times = [v["next_timer_at"] for v in views if v["next_timer_at"] is not None]
    return min(times) if times else None


@pytest.fixture
async def distributed(pg_pool, redis_client, process_stack: ProcessStack, rabbitmq_harness):
    process_stack.configure(
        replay_clock_start=START, balance_partitions=False, api_token=TOKEN,
        partitions=PARTITIONS,
    )  # fmt: skip
    bus = await rabbitmq_harness.bus(partitions=PARTITIONS, source="feed/sim")
    decisions = await EventCollector(WATCHER).attach(bus, *DECISIONS)
    ports = {cls.name: free_port() for cls in SERVICES}
    for cls in SERVICES:
        process_stack.serve(cls.name, http_port=ports[cls.name], **SETTINGS.get(cls.name, {}))

    async def running() -> bool:
        for port in ports.values():
            ready = await asyncio.to_thread(http_json, f"http://127.0.0.1:{port}/readyz")
            if not ready or not ready.get("ready"):
                return False
        state = await asyncio.to_thread(http_json, f"http://127.0.0.1:{ports['trading']}/state")
        return bool(state) and state.get("role") == "active"

    await eventually(running, 90, what="the five services ready", details=process_stack.logs,
                     interval=0.2)  # fmt: skip
    system = Distributed(process_stack, ports, bus)
    yield system, decisions
    for api in system.apis.values():
        await api.close()


async def test_embedded_and_distributed_take_the_same_decisions(distributed):
    system, watched = distributed
    stream = market_stream()
    embedded_decisions, embedded_pnl = await embedded_run(stream)
    expected = per_token(embedded_decisions)
    kinds = Counter(kind for decisions in expected.values() for kind, _ in decisions)
    # entries in several tokens, fills, and exits by the rules
    assert len(expected) >= 2 and kinds["order.filled"] >= 5 and kinds["exit.order"] >= 2, kinds

    await drive(system, stream)
    got = per_token(watched.events)
    for mint in sorted(expected.keys() | got.keys()):
        assert got.get(mint) == expected.get(mint), mint
    # the same book, and the same reasons for the predictions that ordered nothing
    _, pnl = await system.apis["trading"].request("GET", "/pnl")
    assert pnl == msgspec.to_builtins(embedded_pnl)
