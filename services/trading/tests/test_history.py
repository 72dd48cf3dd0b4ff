"""Trading over weeks: a restart reads from the ledger the positions open or closed
lately, not every fill ever stored, and still counts every position in its capital,
PnL and views."""

from __future__ import annotations

import pytest

from pumpflow.common.events import ExitOrder, make_event
from pumpflow.common.trading.positions import REALIZATIONS_KEPT_S
from pumpflow.common.trading.risk import SECONDS_PER_DAY
from pumpflow.trading.ledger import PostgresLedger

from .test_service import publish, ready, running, trading

HOUR = 3600.0


class LoadsSeen(PostgresLedger):
    """The ledger in Postgres, keeping what each load gave back."""

    def __init__(self, pool):
        super().__init__(pool)
        self.snapshots = []

    async def load(self, **kwargs):
        snapshot = await super().load(**kwargs)
        self.snapshots.append(snapshot)
        return snapshot


async def round_trip(bus, market, clock, watch, *, sell: float = 1.0) -> str:
    """Enter a new token and sell ``sell`` of it; its mint."""
    mint = await ready(bus, market)
    await publish(bus, market.prediction(mint))
    await clock.advance(1.0)
    [opened] = [p for p in watch.payloads("position.opened") if p.mint == mint]
    # another wallet sells after the entry: the sale realises a loss
    await publish(bus, market.tokens.sell(mint, "alice"))
    sale = ExitOrder(
        order_id=f"{opened.position_id}:exit:1",
        mint=mint,
        position_id=opened.position_id,
        token_amount=opened.token_amount * sell,
    )
    await publish(bus, make_event(sale, source="exit/t", time=clock.now()))
    await clock.advance(1.0)
    return mint


async def test_a_restart_reads_the_recent_positions_and_counts_every_one(clock, market, pg_pool):
    ledger = LoadsSeen(pg_pool)
    # days pass between the rounds of trading, without a word from the feed
    quiet = {"trading_max_silence_s": 10 * SECONDS_PER_DAY}
    first = trading(ledger, **quiet)
    async with running(clock, first) as (bus, watch):
        old = [await round_trip(bus, market, clock, watch) for _ in range(3)]
        clock.set_sync(clock.now() + SECONDS_PER_DAY)
        yesterday = [await round_trip(bus, market, clock, watch) for _ in range(2)]
        clock.set_sync(clock.now() + SECONDS_PER_DAY)
        today = [await round_trip(bus, market, clock, watch) for _ in range(2)]
        held = await round_trip(bus, market, clock, watch, sell=0.5)
        clock.set_sync(clock.now() + HOUR)
        await clock.advance(1.0)
        day_start = clock.now() // SECONDS_PER_DAY * SECONDS_PER_DAY
        closed = {p.mint: p for p in watch.payloads("position.closed")}
        assert set(closed) == {*old, *yesterday, *today}
        # the old round closed before the window the daily loss limit reads, the others in it
        cutoff = clock.now() - REALIZATIONS_KEPT_S
        rows = await ledger.positions(open_only=False, limit=100)
        closed_at = {row["mint"]: row["closed_at"] for row in rows}
        assert all(closed_at[m] < cutoff for m in old)
        assert all(cutoff <= closed_at[m] < day_start for m in yesterday)
        assert all(closed_at[m] >= day_start for m in today)
        before = first.pnl()
        held_realized = first.book.open_positions[held].realized_pnl_sol
        realized_today = first.book.realized_since(day_start)
        views_before = (await first.positions(open_only=False))["positions"]
    assert before["realized_pnl_sol"] == pytest.approx(
        sum(p.realized_pnl_sol for p in closed.values()) + held_realized, rel=1e-9
    )
    assert realized_today < 0 and before["closed_positions"] == 7

    second = trading(ledger, **quiet)
    async with running(clock, second):
        # the old positions' fills stay in the ledger: neither read nor kept
        [*_, loaded] = ledger.snapshots
        assert {f.mint for f in loaded.fills} == {*yesterday, *today, held}
        book = second.book
        assert [p.mint for p in book.closed_positions] == [*yesterday, *today]
        assert book.open_positions.keys() == {held}
        assert book.applied_orders == {f.order_id for f in loaded.fills}
        assert len(book.applied_orders) == 2 * 4 + 2
        # the same figures as the replica that traded them all
        after = second.pnl()
        for name in ("capital_sol", "realized_pnl_sol", "fees_sol", "exposure_sol"):
            assert after[name] == pytest.approx(before[name], rel=1e-9), name
        assert (after["open_positions"], after["closed_positions"]) == (1, 7)
        assert second.risk.capital == pytest.approx(first.risk.capital, rel=1e-9)
        assert book.realized_since(day_start) == realized_today
        assert second.risk.daily_loss_hit == first.risk.daily_loss_hit
        # the old positions in the view from the ledger, the others from the book
        views = (await second.positions(open_only=False))["positions"]
        assert [v["position_id"] for v in views] == [v["position_id"] for v in views_before]
        for seen, was in zip(views, views_before, strict=True):
            names = ["closed_at", "realized_pnl_sol", "fees_sol", "token_amount", "cost_sol"]
            if was["closed_at"] is not None:
                names += ["pnl_sol", "unrealized_pnl_sol"]
            for name in names:
                expected = was[name] if was[name] is None else pytest.approx(was[name], rel=1e-9)
                assert seen[name] == expected, (seen["mint"], name)
