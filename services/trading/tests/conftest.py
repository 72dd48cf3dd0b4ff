"""Helpers of trading's domain tests: token events on the real curve, and a ready token.

A ready token passes every entry filter: it was created and traded (so trading knows
its curve), its features vector is comfortably inside every filter, and activity
calls it active and urgent. A prediction then is a chance to enter it.
"""

from __future__ import annotations

import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import (
    Event,
    FeaturesUpdated,
    ModelPrediction,
    OrderFilled,
    OrderRejected,
    TokenLifecycle,
    make_event,
)
from pumpflow.common.priority import Priority
from pumpflow.common.testing import TokenEvents
from pumpflow.common.trading import (
    DecisionPolicy,
    PaperBroker,
    PositionBook,
    RiskManager,
    TradingEngine,
)

START = 1_700_000_000.0

#: a features vector inside every default entry filter
GOOD_FEATURES = {
    "time_since_launch": 60.0,
    "curve_progress": 0.2,
    "creator_holding_share": 0.02,
    "creator_sold": 0.0,
    "buy_volume_sol_60s": 5.0,
    "unique_traders": 25.0,
    "top_buyer_share": 0.2,
    "price": 5e-8,
}


class Market:
    """Builds the events trading consumes, stamped with the test's clock."""

    def __init__(self, clock: ReplayClock):
        self.clock = clock
        self.tokens = TokenEvents(clock=clock)

    def features(self, mint: str, **overrides: float) -> Event:
        values = {**GOOD_FEATURES, **overrides}
        payload = FeaturesUpdated(
            mint=mint,
            feature_set_version="test",
            source_seq=1,
            names=tuple(values),
            values=tuple(float(v) for v in values.values()),
        )
        return make_event(payload, source="features/test", time=self.clock.now())

    def lifecycle(self, mint: str, state: str = "active", priority: int = Priority.URGENT) -> Event:
        payload = TokenLifecycle(mint=mint, state=state, priority=int(priority))
        return make_event(payload, source="activity/test", time=self.clock.now())

    def prediction(self, mint: str, score: float = 0.9) -> Event:
        payload = ModelPrediction(
            mint=mint, model_id="m1", arm="a", feature_set_version="test", score=score
        )
        return make_event(payload, source="model/test", time=self.clock.now())

    def filled(self, fill: OrderFilled | OrderRejected) -> Event:
        return make_event(fill, source="trading/paper", time=self.clock.now())

    def ready(
        self,
        engine: TradingEngine,
        mint: str | None = None,
        *,
        broker: PaperBroker | None = None,
        **features: float,
    ) -> str:
        """A token created, bought into and scored inside every filter; return its mint.

        ``broker`` sees the token events too, as the paper executor would.
        """
        mint = mint or self.tokens.mint()
        for event in (
            self.tokens.created(mint, sol=0.5, name="Good Coin", symbol="GOOD", trader="dev"),
            self.tokens.buy(mint, "alice", sol=3.0),
            self.features(mint, **features),
            self.lifecycle(mint),
        ):
            assert [e.type for e in engine.process(event)] == []
            if broker is not None:
                broker.observe(event.data, time=event.time)
        return mint


@pytest.fixture
def clock() -> ReplayClock:
    return ReplayClock(START)


@pytest.fixture
def market(clock) -> Market:
    return Market(clock)


@pytest.fixture
def book() -> PositionBook:
    return PositionBook()


@pytest.fixture
def risk(book, clock) -> RiskManager:
    return RiskManager(100.0, 0.02, 5, positions=book, clock=clock)


@pytest.fixture
def engine(book, risk, clock) -> TradingEngine:
    return TradingEngine(None, book, risk, policy=DecisionPolicy(), clock=clock)


@pytest.fixture
def broker() -> PaperBroker:
    return PaperBroker()
