"""Helpers of the activity service tests: token events on the real curve."""

from __future__ import annotations

import pytest

from pumpflow.common.bus import Sequencer
from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import CurveState, quote_buy, quote_sell
from pumpflow.common.events import Event, TokenCreated, TokenMigrated, TokenTrade, make_event

START = 1_700_000_000.0


class TokenEvents:
    """Builds feed events (token.created / token.trade / token.migrated) stamped by a clock."""

    def __init__(self, clock: ReplayClock):
        self.clock = clock
        self.curves: dict[str, CurveState] = {}
        self.holdings: dict[tuple[str, str], float] = {}
        self.seq = Sequencer()
        self.n = 0

    def _event(self, payload, mint: str) -> Event:
        self.n += 1
        return make_event(
            payload, source="feed/test", time=self.clock.now(), seq=self.seq.next(mint)
        )

    def created(self, mint: str, sol: float = 0.5) -> Event:
        quote = quote_buy(CurveState(), sol)
        self.curves[mint] = quote.after
        self.holdings[(mint, "creator")] = quote.tokens
        return self._event(
            TokenCreated(
                signature=f"sig{self.n}", mint=mint, traderPublicKey="creator", txType="create",
                initialBuy=quote.tokens, solAmount=sol, bondingCurveKey="curve",
                vTokensInBondingCurve=quote.after.v_tokens, vSolInBondingCurve=quote.after.v_sol,
                marketCapSol=quote.after.market_cap_sol, name="T", symbol="T", uri="u",
            ),
            mint,
        )

    def trade(self, mint: str, trader: str, *, buy: bool = True, sol: float = 0.3) -> Event:
        curve = self.curves[mint]
        held = self.holdings.get((mint, trader), 0.0)
        if buy:
            quote = quote_buy(curve, sol)
            held += quote.tokens
        else:
            quote = quote_sell(curve, held)
            held = 0.0
        self.curves[mint] = quote.after
        self.holdings[(mint, trader)] = held
        return self._event(
            TokenTrade(
                signature=f"sig{self.n}", mint=mint, traderPublicKey=trader,
                txType="buy" if buy else "sell", tokenAmount=quote.tokens,
                newTokenBalance=held, bondingCurveKey="curve",
                vTokensInBondingCurve=quote.after.v_tokens, vSolInBondingCurve=quote.after.v_sol,
                marketCapSol=quote.after.market_cap_sol, solAmount=quote.sol,
            ),
            mint,
        )

    def migrated(self, mint: str) -> Event:
        return self._event(
            TokenMigrated(signature=f"sig{self.n}", mint=mint, txType="migrate", pool="pump-amm"),
            mint,
        )


@pytest.fixture
def clock() -> ReplayClock:
    return ReplayClock(START)


@pytest.fixture
def tokens(clock) -> TokenEvents:
    return TokenEvents(clock)


@pytest.fixture
def token_events_class() -> type[TokenEvents]:
    """The event builder itself, for tests that bring their own clock."""
    return TokenEvents
