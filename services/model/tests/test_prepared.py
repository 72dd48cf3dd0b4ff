"""What ``prepare`` scores ahead for a delivery leaves with the delivery, applied or not:
a vector prepared and never applied (a duplicate of a key no longer in memory) keeps no
entry once its delivery is over."""

from __future__ import annotations

import pytest
from model_helpers import START
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import FeatureUpdates
from pumpflow.model.service import ModelService, ModelSettings
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

PARTITIONS = 4


@pytest.fixture
async def model():
    clock = ReplayClock(START)
    bus = InMemoryBus(partitions=PARTITIONS, synchronous=True, source="test")
    await bus.start()
    settings = ModelSettings.load(
        service="model", transport="memory", partitions=PARTITIONS,
        model_monitor_s=3600.0, model_refit=False,
    )  # fmt: skip
    service = ModelService(settings, registry=CollectorRegistry())
    store = MemoryStateStore(clock)
    await service.start(ServiceContext(settings=settings, bus=bus, clock=clock, store=store))
    try:
        yield service
    finally:
        await service.stop()
        await bus.close()


def first_vectors(count: int):
    """One vector of each of ``count`` tokens, the first of each."""
    vectors = FeatureUpdates().of(
        market_events(Market(MarketConfig(seed=5)), 60.0, start_epoch=START, source="feed/sim")
    )
    firsts = {}
    for vector in vectors:
        firsts.setdefault(vector.key, vector)
    assert len(firsts) >= count
    return list(firsts.values())[:count]


async def test_deliveries_of_keys_revoked_meanwhile_leave_nothing_prepared(model):
    consumer, processor = model.consumer, model.processor
    batch = first_vectors(20)
    await consumer.handle_batch(batch)
    assert processor.prepared_rows == len(batch) and processor._prepared == {}
    # the partitions move away while the broker hands the batch out again: no state
    # held says it was scored, so it is prepared, then each vector is a duplicate of its
    # stored record, never applied
    await consumer.revoke(tuple(range(PARTITIONS)))
    await consumer.handle_batch(batch)
    assert processor.prepared_rows == 2 * len(batch)
    assert consumer.metrics.counts()["duplicates"] == len(batch)
    assert processor._prepared == {}
    # a delivery of one alike
    await consumer.revoke(tuple(range(PARTITIONS)))
    await consumer.handle(batch[0])
    assert processor.prepared_rows == 2 * len(batch) + 1
    assert processor._prepared == {}
