"""Token event streams from the simulated market, as the feed would publish them."""

from __future__ import annotations

import msgspec

from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.events import Event, TokenCreated, TokenMigrated, TokenTrade, make_event

SCHEMAS = {"create": TokenCreated, "buy": TokenTrade, "sell": TokenTrade, "migrate": TokenMigrated}


def market_events(seed: int, duration_s: float, *, start: float = 1_700_000_000.0) -> list[Event]:
    from pumpflow.simulator.market import Market, MarketConfig

    seqs = Sequencer()
    events = []
    for t, frame in Market(MarketConfig(seed=seed)).frames(duration_s):
        payload = msgspec.convert(frame, SCHEMAS[frame["txType"]])
        events.append(
            make_event(payload, source="feed/sim", time=start + t, seq=seqs.next(payload.mint))
        )
    return events


class Collector:
    """Records features.updated events per mint."""

    def __init__(self) -> None:
        self.by_mint: dict[str, list[Event]] = {}

    async def __call__(self, event: Event) -> None:
        self.by_mint.setdefault(event.key, []).append(event)
