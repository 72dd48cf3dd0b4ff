"""Trading's domain: entry decisions, risk, paper fills and the position book; no I/O.

The trading service wraps these with the bus, the Postgres ledger, HTTP and the
leader lease; everything here takes its collaborators and clock by injection.
"""

from pumpflow.common.curve import MIGRATION_POOL
from pumpflow.common.trading.decisions import (
    ENTRY_STATES,
    FILTER_FEATURES,
    DecisionPolicy,
    EntryDecision,
    TokenView,
    admit_seq,
    derived_id,
    order_id_for,
)
from pumpflow.common.trading.engine import (
    CONSUMES,
    SERVICE_CONSUMES,
    Decision,
    FillOverLimit,
    TradingEngine,
)
from pumpflow.common.trading.fills import (
    VENUE_CURVE,
    VENUE_POOL,
    FillRejection,
    PaperFill,
    exit_value,
    fill_buy,
    fill_sell,
)
from pumpflow.common.trading.live import (
    Confirmation,
    EarlyTrade,
    LiveBook,
    LiveOrder,
    UnbookedTrade,
    confirmed_fill,
    live_entry_spend,
)
from pumpflow.common.trading.orders import rejected
from pumpflow.common.trading.paper import PaperBroker, PaperOrder, PaperOutcome
from pumpflow.common.trading.positions import Position, PositionBook, SaleReservation
from pumpflow.common.trading.reasons import Reason
from pumpflow.common.trading.risk import (
    BREAKERS,
    LIMITS,
    CircuitBreaker,
    EntrySpend,
    Holdings,
    LimitBreach,
    RiskCheck,
    RiskManager,
    TradingState,
)
from pumpflow.common.trading.settings import (
    MAX_ENTRY_SLIPPAGE_PCT,
    MAX_PRIORITY_FEE_SOL,
    MIN_LIVE_CONFIRM_S,
    BreakerSettings,
    EntryFilters,
    LiveExecution,
    PaperExecution,
    RiskLimits,
)

__all__ = [
    "BREAKERS",
    "CONSUMES",
    "ENTRY_STATES",
    "FILTER_FEATURES",
    "LIMITS",
    "MAX_ENTRY_SLIPPAGE_PCT",
    "MAX_PRIORITY_FEE_SOL",
    "MIGRATION_POOL",
    "MIN_LIVE_CONFIRM_S",
    "SERVICE_CONSUMES",
    "VENUE_CURVE",
    "VENUE_POOL",
    "BreakerSettings",
    "CircuitBreaker",
    "Confirmation",
    "Decision",
    "DecisionPolicy",
    "EarlyTrade",
    "EntryDecision",
    "EntryFilters",
    "EntrySpend",
    "FillOverLimit",
    "FillRejection",
    "Holdings",
    "LimitBreach",
    "LiveBook",
    "LiveExecution",
    "LiveOrder",
    "PaperBroker",
    "PaperExecution",
    "PaperFill",
    "PaperOrder",
    "PaperOutcome",
    "Position",
    "PositionBook",
    "Reason",
    "RiskCheck",
    "RiskLimits",
    "RiskManager",
    "SaleReservation",
    "TokenView",
    "TradingEngine",
    "TradingState",
    "UnbookedTrade",
    "admit_seq",
    "confirmed_fill",
    "derived_id",
    "exit_value",
    "fill_buy",
    "fill_sell",
    "live_entry_spend",
    "order_id_for",
    "rejected",
]
