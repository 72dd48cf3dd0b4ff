"""What the services upstream of trading would publish, for the tests that run trading
(and the exit service) as processes: token events, features, lifecycle, predictions,
stamped by the test's own clock (the wall time, or later), so the test decides when a
paper order falls due."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import (
    Event,
    FeaturesUpdated,
    ModelPrediction,
    TokenLifecycle,
    make_event,
)
from pumpflow.common.priority import Priority
from pumpflow.common.testing import TokenEvents

#: a features vector inside every default entry filter of trading
GOOD_FEATURES = {
    "time_since_launch": 60.0, "curve_progress": 0.2, "creator_holding_share": 0.02,
    "creator_sold": 0.0, "buy_volume_sol_60s": 5.0, "unique_traders": 25.0,
    "top_buyer_share": 0.2,
}  # fmt: skip


class Upstream:
    """What the feed, features, activity and model services would publish."""

    def __init__(self, bus):
        self.bus = bus
        self.clock = ReplayClock(time.time())
        self.tokens = TokenEvents(clock=self.clock)

    def _now(self) -> None:
        self.clock.set_sync(max(self.clock.now(), time.time()))

    async def publish(self, *events: Event) -> None:
        for event in events:
            await self.bus.publish(event)

    async def ready(self, mint: str | None = None) -> str:
        """A new token trading would enter on a prediction."""
        self._now()
        mint = mint or self.tokens.mint()
        features = FeaturesUpdated(
            mint=mint, feature_set_version="test", source_seq=1,
            names=tuple(GOOD_FEATURES), values=tuple(GOOD_FEATURES.values()),
        )  # fmt: skip
        now = self.clock.now()
        await self.publish(
            self.tokens.created(mint, sol=0.5, name="Good Coin", symbol="GOOD", trader="dev"),
            self.tokens.buy(mint, "alice", sol=3.0),
            make_event(features, source="features/test", time=now),
            self.lifecycle(mint),
        )
        return mint

    def lifecycle(self, mint: str, priority: int = int(Priority.URGENT)) -> Event:
        """Activity calls ``mint`` active, at ``priority``."""
        self._now()
        payload = TokenLifecycle(mint=mint, state="active", priority=priority)
        return make_event(payload, source="activity/test", time=self.clock.now())

    def prediction(self, mint: str, score: float = 0.9) -> Event:
        self._now()
        payload = ModelPrediction(
            mint=mint, model_id="m1", arm="a", feature_set_version="test", score=score
        )
        return make_event(payload, source="model/test", time=self.clock.now())

    async def trade_after(self, mint: str, seconds: float) -> None:
        """A trade stamped ``seconds`` from now: what fills an order due before then."""
        later = time.time() + seconds
        await self.publish(self.tokens.buy(mint, "bob", sol=0.5, time=later))


def post(url: str, token: str | None, body: dict) -> tuple[int, dict]:
    """Status and JSON body of a POST, with the bearer ``token`` if given."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
