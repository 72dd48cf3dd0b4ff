"""The keyed stateful consumer: the infrastructure every per-mint stateful service runs on."""

from pumpflow.common.consumer.keyed import (
    KeyedConsumerConfig,
    KeyedStatefulConsumer,
    Record,
    ViewsFunction,
)
from pumpflow.common.consumer.metrics import ConsumerMetrics

__all__ = [
    "ConsumerMetrics",
    "KeyedConsumerConfig",
    "KeyedStatefulConsumer",
    "Record",
    "ViewsFunction",
]
