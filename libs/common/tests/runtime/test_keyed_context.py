"""ServiceContext.keyed_consumer: the consumer on the context's bus, store and clock."""

from __future__ import annotations

import pytest

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.consumer import KeyedConsumerConfig
from pumpflow.common.features import FeatureManager
from pumpflow.common.features.processor import FeaturesProcessor
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.state import MemoryStateStore


def context(*, store: bool) -> ServiceContext:
    clock = ReplayClock(0.0)
    settings = CommonSettings.load(service="sample", transport="memory", partitions=4)
    return ServiceContext(
        settings=settings,
        bus=InMemoryBus(partitions=4, source="sample/t"),
        clock=clock,
        store=MemoryStateStore(clock) if store else None,
    )


def test_the_consumer_takes_the_contexts_collaborators():
    ctx = context(store=True)
    processor = FeaturesProcessor(FeatureManager(), retire_ttl_s=60.0)
    consumer = ctx.keyed_consumer(
        processor, KeyedConsumerConfig(service="sample", patterns=("token.trade",))
    )
    assert consumer.bus is ctx.bus and consumer.store is ctx.store
    assert consumer.clock is ctx.clock and consumer.source == ctx.source


def test_a_context_without_a_store_says_which_service_needs_one():
    ctx = context(store=False)
    processor = FeaturesProcessor(FeatureManager(), retire_ttl_s=60.0)
    with pytest.raises(RuntimeError, match="sample service needs a state store"):
        ctx.keyed_consumer(processor, KeyedConsumerConfig(service="sample", patterns=("token.*",)))
