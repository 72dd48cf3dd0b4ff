"""Exits' domain: the exit rules of a position, the graceful exit's plan, exit reports.

No I/O: the exit service wraps these with the bus, Postgres, HTTP and metrics;
everything here takes its collaborators and clock by injection.
"""

from pumpflow.common.exit.graceful import (
    ExitExecutor,
    ExitProgress,
    GracefulExitManager,
    OpenPositions,
    Publisher,
)
from pumpflow.common.exit.planner import (
    DEADLINE,
    GRACEFUL,
    ExitPlanner,
    GracefulExitConfig,
    HeldPosition,
    PlannedTranche,
    QueuedExit,
    Score,
    tranche_order_id,
)
from pumpflow.common.exit.report import ExitRecord, GracefulExitSummary, TrancheFill
from pumpflow.common.exit.rules import (
    DECLINE,
    FULL_EXIT_RULES,
    INACTIVITY,
    MIGRATION,
    STALE_STOP,
    STOP_LOSS,
    TAKE_PROFIT,
    TIME_STOP,
    TRAILING_STOP,
    ExitDecision,
    ExitEvaluator,
    ExitPosition,
    ExitRules,
    TakeProfitStep,
    TrailBand,
)

__all__ = [
    "DEADLINE",
    "DECLINE",
    "FULL_EXIT_RULES",
    "GRACEFUL",
    "INACTIVITY",
    "MIGRATION",
    "STALE_STOP",
    "STOP_LOSS",
    "TAKE_PROFIT",
    "TIME_STOP",
    "TRAILING_STOP",
    "ExitDecision",
    "ExitEvaluator",
    "ExitExecutor",
    "ExitPlanner",
    "ExitPosition",
    "ExitProgress",
    "ExitRecord",
    "ExitRules",
    "GracefulExitConfig",
    "GracefulExitManager",
    "GracefulExitSummary",
    "HeldPosition",
    "OpenPositions",
    "PlannedTranche",
    "Publisher",
    "QueuedExit",
    "Score",
    "TakeProfitStep",
    "TrailBand",
    "TrancheFill",
    "tranche_order_id",
]
