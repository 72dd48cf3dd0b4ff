"""Labels waiting for their horizon outlive their replica: a replica that stops (its
partitions revoked and handed over) or dies leaves them stored with its tokens' state,
and the next owner releases each of them once, at its horizon. On both transports: the
in-memory bus and store, and RabbitMQ with Redis."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from model_helpers import DEFAULT_CARD, START
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.model.performance import ResolvedLabel
from pumpflow.common.model.processor import ScoringPolicy
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.abc import StateStore
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import BusHarness, FeatureUpdates, eventually
from pumpflow.model.labels import MemoryLabelStore
from pumpflow.model.service import ModelService, ModelSettings
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

PARTITIONS = 4
#: market seconds scored before the first replica goes: less than the horizon, so every
#: label followed is still waiting then
SCORED_S = 60.0

PAIRS = [
    pytest.param("memory", id="memory"),
    pytest.param("rabbitmq", id="rabbitmq+redis", marks=[pytest.mark.rabbitmq, pytest.mark.redis]),
]


@pytest.fixture(params=PAIRS)
async def transport(request, namespace, amqp_url, redis_url):
    clock = ReplayClock(START)
    buses = BusHarness(request.param, namespace=namespace, amqp_url=amqp_url, partitions=PARTITIONS)
    if request.param == "memory":
        store: StateStore = MemoryStateStore(clock)
    else:
        from pumpflow.common.state.redis import RedisStateStore

        store = RedisStateStore(url=redis_url, namespace=namespace)
    try:
        yield request.param, buses, store, clock
    finally:
        await buses.teardown()
        if request.param != "memory":
            await store.delete_many(await store.scan_keys(""))
            await store.close()


class RecordingLabelStore(MemoryLabelStore):
    """Keeps every label it is given, a copy given again included."""

    def __init__(self):
        super().__init__()
        self.given: list[ResolvedLabel] = []

    async def add(self, labels, *, feature_set_version, names) -> int:
        self.given.extend(labels)
        return await super().add(labels, feature_set_version=feature_set_version, names=names)


async def start_replica(bus: EventBus, store: StateStore, clock: ReplayClock) -> ModelService:
    # the monitor loop stays out of the way: the commits of the tokens store what they
    # release
    settings = ModelSettings.load(
        service="model",
        transport="memory",
        partitions=PARTITIONS,
        model_monitor_s=3600.0,
        model_refit=False,
    )
    service = ModelService(
        settings, registry=CollectorRegistry(), label_store=RecordingLabelStore()
    )
    await service.start(ServiceContext(settings=settings, bus=bus, clock=clock, store=store))
    return service


def followed(predictions, interval_s: float) -> list[tuple[str, float, str]]:
    """The predictions the scoring policy follows to a label: a token's first, then the
    first at least ``interval_s`` after the last one followed."""
    by_mint: dict[str, dict[int, object]] = {}
    for p in predictions:
        by_mint.setdefault(p.key, {})[p.seq] = p  # a copy published again is one
    out = []
    for mint, by_seq in by_mint.items():
        last = None
        for seq in sorted(by_seq):
            p = by_seq[seq]
            if last is None or p.time - last >= interval_s:
                last = p.time
                out.append((mint, p.time, p.data.arm))
    return sorted(out)


@pytest.mark.parametrize("ending", ["stop", "kill"])
async def test_waiting_labels_are_released_once_at_their_horizon_by_the_next_owner(
    transport, ending
):
    kind, buses, store, clock = transport
    vectors = FeatureUpdates().of(
        market_events(Market(MarketConfig(seed=5)), SCORED_S, start_epoch=START, source="feed/sim")
    )
    publisher = await buses.bus("features/test")
    seen = await buses.collector("model.prediction")
    bus = await buses.bus("model/1")
    first = await start_replica(bus, store, clock)
    await clock.advance_to(vectors[-1].time)
    await publisher.publish_many(vectors)

    def all_applied() -> bool:
        counts = first.consumer_metrics.counts()
        return counts["applied"] + counts["duplicates"] >= len(vectors)

    await eventually(all_applied, what="every vector applied")
    await first.consumer.flush()
    published = first.metrics.predictions("control", "entry", DEFAULT_CARD.version)

    def all_seen() -> bool:
        return len({(p.key, p.seq) for p in seen.of("model.prediction")}) >= published

    await eventually(all_seen, what="every prediction published seen")
    expected = followed(seen.of("model.prediction"), ScoringPolicy().label_interval_s)
    assert len(expected) > 20
    assert first.labels.pending == len(expected)
    assert first.labels.resolve_due() == []  # none is due before its horizon

    if ending == "stop":
        # its partitions are revoked (as a rebalance does): their tokens are stored and
        # handed over, and their labels wait here no more
        await first.consumer.revoke(tuple(range(PARTITIONS)))
        first.resolve_labels()
        assert first.metrics.pending_labels() == 0
        await first.stop()
    else:
        # it dies: nothing more is written, its deliveries go back unacked
        for loop in first._loops:
            loop.cancel()
        if kind == "memory":
            await bus.abandon(first.consumer.subscription)
            await first.consumer.abandon()
        else:
            await first.consumer.abandon()
            await bus.close()
    second = await start_replica(await buses.bus("model/2"), store, clock)
    assert second.consumer.owned == set(range(PARTITIONS))

    def pending(service: ModelService) -> float:
        service.resolve_labels()  # what the monitor loop exports every model_monitor_s
        return service.metrics.pending_labels()

    # the labels wait on the next owner now, restored with their tokens
    await eventually(lambda: pending(second) == len(expected), what="the labels counted")
    # the horizon passes: the new owner's timers release them, its commits store them
    await clock.advance_to(vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0)
    released = second.label_store.given

    await eventually(
        lambda: len(released) >= len(expected), what="the waiting labels released by the next owner"
    )
    await second.consumer.flush()
    got = sorted((label.mint, label.time, label.arm) for label in released)
    assert got == expected  # each once
    assert pending(second) == 0
    assert first.labels.resolve_due() == [] and first.label_store.given == []
    predicted = {(p.key, p.time): p for p in seen.of("model.prediction")}
    for label in released:
        prediction = predicted[(label.mint, label.time)]
        assert label.score == prediction.data.score
        assert label.version == DEFAULT_CARD.version and label.label in (0.0, 1.0)
        assert label.resolved_at >= label.time + DEFAULT_CARD.label.horizon_s
        assert len(label.vector()) == len(label.feature_names) > 0
    # nothing waits any more: the tokens' states hold no labels
    for mint in {label.mint for label in released}:
        state = second.consumer.state(mint)
        assert state is None or state.labels is None
    await second.stop()


class DyingLabelStore(MemoryLabelStore):
    """Stores labels, then, while ``dying``, never returns: the process dies after the
    labels' insert and before its tokens' states without them are written."""

    def __init__(self):
        super().__init__()
        self.dying = True
        self.died = asyncio.Event()

    async def add(self, labels, *, feature_set_version, names):
        added = await super().add(labels, feature_set_version=feature_set_version, names=names)
        if self.dying:
            self.died.set()
            await asyncio.Event().wait()
        return added


async def test_labels_released_again_after_their_insert_count_once_in_the_figures(namespace):
    """A replica dies between the insert of released labels and the write of its tokens'
    states without them: the next owner's figures start from the stored labels, and its
    tokens release the same labels again. The store keeps each once, and so do the
    rolling figures."""
    clock = ReplayClock(START)
    buses = BusHarness("memory", namespace=namespace, partitions=PARTITIONS)
    store = MemoryStateStore(clock)
    labels = DyingLabelStore()

    async def replica(name: str) -> ModelService:
        settings = ModelSettings.load(service="model", transport="memory",
                                      partitions=PARTITIONS, model_monitor_s=3600.0,
                                      model_refit=False)  # fmt: skip
        service = ModelService(settings, registry=CollectorRegistry(), label_store=labels)
        bus = await buses.bus(name)
        await service.start(ServiceContext(settings=settings, bus=bus, clock=clock, store=store))
        return service

    try:
        vectors = FeatureUpdates().of(
            market_events(
                Market(MarketConfig(seed=5)), SCORED_S, start_epoch=START, source="feed/sim"
            )
        )
        first = await replica("model/1")
        await clock.advance_to(vectors[-1].time)
        await (await buses.bus("features/test")).publish_many(vectors)

        def all_applied() -> bool:
            counts = first.consumer_metrics.counts()
            return counts["applied"] + counts["duplicates"] >= len(vectors)

        await eventually(all_applied, what="every vector applied")
        await first.consumer.flush()  # the tokens' states hold their waiting labels
        waiting = first.labels.pending
        assert waiting > 20
        # past the horizon: the timers release the labels, a commit stores them and dies
        # (the clock waits on the timers' work, which never ends)
        horizon = vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0
        advancing = asyncio.create_task(clock.advance_to(horizon))
        await asyncio.wait_for(labels.died.wait(), 20.0)
        stored = len(labels.labels)
        assert stored > 0
        for loop in first._loops:
            loop.cancel()
        await (await buses.bus("model/1")).abandon(first.consumer.subscription)
        await first.consumer.abandon()
        advancing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await advancing

        labels.dying = False
        second = await replica("model/2")
        assert second.performance.figures("entry", "control").labels == stored

        def restored() -> bool:
            second.resolve_labels()
            return second.metrics.pending_labels() == waiting

        await eventually(restored, what="the waiting labels restored with their tokens")
        # the restored tokens release every label again, those stored already included:
        # no event comes, so the next owner's time moves on from where its records had
        # got (the market's time the first replica wrote them at), past the horizon
        await clock.advance(horizon - vectors[-1].time)
        await eventually(lambda: len(labels.labels) == waiting,
                         what="every label released stored")  # fmt: skip
        await second.consumer.flush()
        second.resolve_labels()
        assert second.performance.figures("entry", "control").labels == waiting
        await second.stop()
    finally:
        await buses.teardown()


async def _labels_of_a_market(namespace: str, *, outage: bool) -> list[tuple]:
    """The labels of the predictions of a market's first minute, its vectors of four
    minutes applied as the market goes, or, with ``outage``, the replica down after the
    first minute and the next one started with the later vectors queued for it (a
    backlog, of which it scores fewer: a token's vectors delivered together are one)."""
    clock = ReplayClock(START)
    buses = BusHarness("memory", namespace=namespace, partitions=PARTITIONS)
    store = MemoryStateStore(clock)
    vectors = FeatureUpdates().of(
        market_events(Market(MarketConfig(seed=5)), 240.0, start_epoch=START, source="feed/sim")
    )
    publisher = await buses.bus("features/test")
    replicas: list[ModelService] = []

    async def apply(replica: ModelService, events) -> None:
        before = replica.consumer_metrics.counts()["applied"]
        await publisher.publish_many(events)
        await eventually(
            lambda: replica.consumer_metrics.counts()["applied"] >= before + len(events),
            what="the vectors applied",
        )

    try:
        replicas.append(await start_replica(await buses.bus("model/1"), store, clock))
        first = [v for v in vectors if v.time <= START + SCORED_S]
        rest = vectors[len(first) :]
        await clock.advance_to(first[-1].time)
        await apply(replicas[0], first)
        if outage:
            await replicas[0].consumer.revoke(tuple(range(PARTITIONS)))
            await replicas[0].stop()
            await clock.advance_to(rest[-1].time)  # back when the market is here
            replicas.append(await start_replica(await buses.bus("model/2"), store, clock))
            await clock.advance(1.0)  # its tokens' timers are long due on the clock
            await apply(replicas[-1], rest)  # then it drains the queue
        else:
            for second in range(int(SCORED_S) + 1, 241):
                await clock.advance_to(START + second)
                now = [v for v in rest if START + second - 1 < v.time <= START + second]
                if now:
                    await apply(replicas[0], now)
        replica = replicas[-1]
        await clock.advance(DEFAULT_CARD.label.horizon_s + 5.0)

        def waiting() -> float:
            replica.resolve_labels()
            return replica.metrics.pending_labels()

        await eventually(lambda: waiting() == 0, what="every label released")
        await replica.consumer.flush()
        released = [label for r in replicas for label in r.label_store.given]
        return sorted(
            (label.mint, label.time, label.arm, label.label)
            for label in released
            if label.time <= first[-1].time
        )
    finally:
        for replica in replicas:
            await replica.stop()
        await buses.teardown()


async def test_a_replica_started_behind_the_market_labels_the_predictions_as_live(namespace):
    """Restored after an outage, the tokens' waiting labels are long due on the clock, but
    the prices up to their horizon are still queued: they are released as the backlog
    brings those prices, with the labels an unbroken run gives."""
    live = await _labels_of_a_market(namespace, outage=False)
    assert len(live) > 20
    assert await _labels_of_a_market(f"{namespace}-outage", outage=True) == live
