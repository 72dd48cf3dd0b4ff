"""Token activity: lifecycle states, thresholds, the per-token processor and its host."""

from pumpflow.common.activity.analyzer import ActivityAnalyzer, TokenActivity, TokenSnapshot
from pumpflow.common.activity.lifecycle import (
    ACTIVE,
    DECLINING,
    GRADUATED,
    INACTIVE,
    NEW,
    ActivityChange,
    ActivityMetrics,
    LifecycleThresholds,
    Transition,
)
from pumpflow.common.activity.metrics import (
    REQUIRED_FEATURES,
    ActivityMetricsReader,
    InvalidVector,
)
from pumpflow.common.activity.processor import (
    CONSUMES,
    MARKET_TYPES,
    PARTIAL_PUBLISHERS,
    ActivityProcessor,
    ActivityState,
    FeedAction,
    FeedRequestCallback,
)

__all__ = [
    "ACTIVE",
    "CONSUMES",
    "DECLINING",
    "GRADUATED",
    "INACTIVE",
    "MARKET_TYPES",
    "NEW",
    "PARTIAL_PUBLISHERS",
    "REQUIRED_FEATURES",
    "ActivityAnalyzer",
    "ActivityChange",
    "ActivityMetrics",
    "ActivityMetricsReader",
    "ActivityProcessor",
    "ActivityState",
    "FeedAction",
    "FeedRequestCallback",
    "InvalidVector",
    "LifecycleThresholds",
    "TokenActivity",
    "TokenSnapshot",
    "Transition",
]
