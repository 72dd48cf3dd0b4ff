"""Token activity: lifecycle states, thresholds and the ActivityAnalyzer."""

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

__all__ = [
    "ACTIVE",
    "DECLINING",
    "GRADUATED",
    "INACTIVE",
    "NEW",
    "ActivityAnalyzer",
    "ActivityChange",
    "ActivityMetrics",
    "LifecycleThresholds",
    "TokenActivity",
    "TokenSnapshot",
    "Transition",
]
