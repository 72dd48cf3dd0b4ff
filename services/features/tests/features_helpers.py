"""Token event streams from the simulated market, as the feed would publish them."""

from __future__ import annotations

from pumpflow.common.events import Event


def market_events(seed: int, duration_s: float, *, start: float = 1_700_000_000.0) -> list[Event]:
    from pumpflow.simulator.dataset import market_events as simulated
    from pumpflow.simulator.market import Market, MarketConfig

    market = Market(MarketConfig(seed=seed))
    return list(simulated(market, duration_s, start_epoch=start, source="feed/sim"))
