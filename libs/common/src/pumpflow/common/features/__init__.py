"""Token features: declared once, computed incrementally (live) or vectorised (batch).

See :mod:`pumpflow.common.features.manager` for the API.
"""

from pumpflow.common.features.batch import TradeHistory
from pumpflow.common.features.definitions import (
    FeatureDef,
    FeatureDefinitionError,
    default_feature_set,
    feature,
    feature_set_version,
)
from pumpflow.common.features.history import EventHistoryManager, HistoryConfig
from pumpflow.common.features.inputs import TradeInput, event_input, sol_amount_of, trade_input
from pumpflow.common.features.manager import FeatureManager, FeatureVector
from pumpflow.common.features.state import Layout, TokenState

__all__ = [
    "EventHistoryManager",
    "FeatureDef",
    "FeatureDefinitionError",
    "FeatureManager",
    "FeatureVector",
    "HistoryConfig",
    "Layout",
    "TokenState",
    "TradeHistory",
    "TradeInput",
    "default_feature_set",
    "event_input",
    "feature",
    "feature_set_version",
    "sol_amount_of",
    "trade_input",
]
