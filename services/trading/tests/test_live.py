"""The live executor inside the embedded trading service, against a local fake of
PumpPortal's trade API (pumpflow.common.testing.trade_api, 127.0.0.1): success, an error answer, no
answer, and a signature whose trade never shows. Every case sends the order once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.events import (
    Event,
    ExitOrder,
    OrderFilled,
    OrderRequested,
    PositionOpened,
    make_event,
)
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.runner import run_service
from pumpflow.common.runtime.settings import SettingsError
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.testing import EventCollector, base58_key, eventually
from pumpflow.common.testing.trade_api import FakeTradeApi, fake_trade_api
from pumpflow.common.trading import MIN_LIVE_CONFIRM_S
from pumpflow.trading.ledger import FillRecord, LedgerChange, MemoryLedger, OrderRecord
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .test_service import BlinkingLedger, publish, ready, running

KEY = "fake-api-key-never-logged"
WALLET = base58_key("ourwallet")
CONFIRM_S = MIN_LIVE_CONFIRM_S


def live_settings(api: FakeTradeApi, **settings: object) -> dict[str, object]:
    """Live trading through the fake ``api``, ``settings`` on top."""
    return {
        "trading_executor": "live",
        "trading_live_enabled": True,
        "pumpportal_api_key": KEY,
        "trading_live_wallet": WALLET,
        "trading_live_url": api.url,
        **settings,
    }


def live(ledger: MemoryLedger, api: FakeTradeApi, **settings: object) -> TradingService:
    values = live_settings(
        api,
        **{"trading_live_confirm_s": CONFIRM_S, "trading_live_answer_timeout_s": 0.3, **settings},
    )
    config = TradingSettings.load(service="trading", transport="memory", **values)
    return TradingService(config, registry=CollectorRegistry(), ledger=ledger)


@dataclass(frozen=True, slots=True, kw_only=True)
class Entered:
    """A live trading service, running, that ordered an entry of a ready token."""

    ledger: MemoryLedger
    service: TradingService
    bus: EventBus
    watch: EventCollector
    mint: str
    prediction: Event
    request: OrderRequested


@contextlib.asynccontextmanager
async def entered(clock, market, api: FakeTradeApi, **settings: object) -> AsyncIterator[Entered]:
    """A live service on ``api`` and a fresh ledger, given a ready token and the
    prediction it orders an entry on, for the block's duration."""
    ledger = MemoryLedger()
    service = live(ledger, api, **settings)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        prediction = market.prediction(mint)
        await publish(bus, prediction)
        [request] = watch.payloads("order.requested")
        yield Entered(
            ledger=ledger,
            service=service,
            bus=bus,
            watch=watch,
            mint=mint,
            prediction=prediction,
            request=request,
        )


async def bought(run: Entered, api: FakeTradeApi, market) -> PositionOpened:
    """The entry's call answered and the wallet's trade that fills it: the position opened."""
    await answered(run.service, api)
    [call] = api.requests
    await publish(
        run.bus,
        market.tokens.buy(run.mint, WALLET, sol=run.request.sol_amount, signature=call.signature),
    )
    [opened] = run.watch.payloads("position.opened")
    return opened


async def sell_all(run: Entered, opened: PositionOpened, clock, *, reason: str) -> ExitOrder:
    """Publish the exit service's order to sell the whole position; return it."""
    sale = ExitOrder(
        order_id=f"{opened.position_id}:exit:1",
        mint=opened.mint,
        position_id=opened.position_id,
        token_amount=opened.token_amount,
        reason=reason,
    )
    await publish(run.bus, make_event(sale, source="exit/t", time=clock.now()))
    return sale


async def answered(service: TradingService, api: FakeTradeApi, requests: int = 1) -> None:
    """Wait until the fake has had ``requests`` calls and each has come back."""
    await eventually(
        lambda: len(api.requests) >= requests and not service.executor.calls,
        what="the trade API's answer",
    )


async def order_of(ledger: MemoryLedger) -> dict:
    [order] = await ledger.orders(limit=10)
    return order


def fees_of(service: TradingService, moved: float) -> float:
    """What a buy moving ``moved`` SOL into the curve costs in all (the paper rates)."""
    fees = service.settings.execution()
    gross = moved * (1 + fees.curve_fee_rate)
    return gross * (1 + fees.api_fee_rate) + service.settings.trading_live_priority_fee_sol


async def test_success_the_answer_is_not_a_fill_the_wallets_trade_is(clock, market, caplog):
    caplog.set_level(logging.DEBUG)
    async with fake_trade_api("success") as api, entered(clock, market, api) as run:
        service, request, mint = run.service, run.request, run.mint
        await answered(service, api)
        [sent] = api.requests
        assert sent.api_key == KEY
        assert sent.body == {
            "action": "buy",
            "mint": mint,
            "amount": request.sol_amount,
            "denominatedInSol": "true",
            "slippage": request.slippage_pct,
            "priorityFee": service.settings.trading_live_priority_fee_sol,
            "pool": "pump",
        }
        # the signature is stored; the order waits for its trade
        await clock.advance(service.settings.trading_tick_s)
        order = await order_of(run.ledger)
        assert order["state"] == "sent" and order["signature"] == sent.signature
        assert run.watch.count("order.filled") == 0 and not service.book.holds(mint)

        # another wallet's trade, and ours with another signature: neither confirms
        await publish(
            run.bus,
            market.tokens.buy(mint, "bob", sol=0.2, signature=sent.signature),
            market.tokens.buy(mint, WALLET, sol=0.2),
        )
        assert run.watch.count("order.filled") == 0

        ours = market.tokens.buy(mint, WALLET, sol=request.sol_amount, signature=sent.signature)
        await publish(run.bus, ours)
        [fill] = run.watch.payloads("order.filled")
        [opened] = run.watch.payloads("position.opened")
        assert fill.order_id == request.order_id and fill.signature == sent.signature
        assert fill.token_amount == ours.data.tokenAmount
        assert fill.sol_amount == pytest.approx(fees_of(service, ours.data.solAmount))
        assert opened.token_amount == fill.token_amount
        order = await order_of(run.ledger)
        assert order["state"] == "filled"
        assert len(api.requests) == 1
    assert KEY not in caplog.text


async def test_an_exit_order_is_sold_through_the_trade_api_and_filled_by_the_wallets_trade(
    clock, market
):
    async with fake_trade_api("success") as api, entered(clock, market, api) as run:
        mint = run.mint
        opened = await bought(run, api, market)

        sale = await sell_all(run, opened, clock, reason="take profit")
        await answered(run.service, api, 2)
        sold = api.requests[1]
        assert sold.body["action"] == "sell" and sold.body["mint"] == mint
        assert sold.body["amount"] == opened.token_amount
        assert sold.body["denominatedInSol"] == "false"
        await publish(
            run.bus,
            market.tokens.sell(mint, WALLET, tokens=opened.token_amount, signature=sold.signature),
        )
        [fill] = [f for f in run.watch.payloads("order.filled") if f.side == "sell"]
        assert fill.order_id == sale.order_id and fill.signature == sold.signature
        # where the wallet's trade was: on the curve (the stream reports it, signature and all)
        assert fill.venue == "pump"
        [closed] = run.watch.payloads("position.closed")
        assert closed.position_id == opened.position_id and closed.reason == "take profit"
        assert not run.service.book.holds(mint)
        assert len(api.requests) == 2


async def test_a_live_positions_unrealised_pnl_is_what_selling_it_then_realises(clock, market):
    """The mark counts every fee of the sale that would close the position, the priority
    fee included: sold on the market it was marked on, the position realises its
    unrealised PnL exactly."""
    async with fake_trade_api("success") as api, entered(clock, market, api) as run:
        opened = await bought(run, api, market)
        await publish(run.bus, market.tokens.buy(run.mint, "bob", sol=1.0))
        unrealized = run.service.pnl()["unrealized_pnl_sol"]

        await sell_all(run, opened, clock, reason="take profit")
        await answered(run.service, api, 2)
        sold = api.requests[1]
        await publish(
            run.bus,
            market.tokens.sell(
                run.mint, WALLET, tokens=opened.token_amount, signature=sold.signature
            ),
        )
        [closed] = run.watch.payloads("position.closed")
        assert closed.realized_pnl_sol == pytest.approx(unrealized, rel=1e-9)


async def test_sales_in_flight_together_never_ask_the_trade_api_for_more_than_is_held(
    clock, market
):
    async with fake_trade_api("success") as api, entered(clock, market, api) as run:
        opened = await bought(run, api, market)
        held = opened.token_amount
        for n in (1, 2, 3):
            sale = ExitOrder(
                order_id=f"{opened.position_id}:exit:{n}",
                mint=opened.mint,
                position_id=opened.position_id,
                token_amount=held * 0.7,
            )
            await publish(run.bus, make_event(sale, source="exit/t", time=clock.now()))
        await answered(run.service, api, 3)
        sold = [r.body["amount"] for r in api.requests if r.body["action"] == "sell"]
        assert sold == pytest.approx([held * 0.7, held * 0.3])
        [refused] = run.watch.payloads("order.rejected")
        assert refused.order_id == f"{opened.position_id}:exit:3"
        assert "sales in flight" in refused.reason


async def test_live_entries_filled_at_the_worst_slippage_never_push_exposure_past_a_limit(
    clock, market
):
    """Seven tokens predicted in a burst, each entry's trade landing at the most its order
    allows (the price up by the whole slippage, the curve's and the API's fees on top,
    the priority fee): with 5 SOL of capital, no trade and no token passes 0.5 SOL and
    all of them 2.5 SOL, while the orders are in flight and once they are filled; each
    position carries what its trade cost, and no reservation is left."""
    capital = 5.0
    settings = {
        "trading_capital_sol": capital,
        # every entry sized at the per-trade cap, and the total the limit that binds
        "trading_max_risk_per_trade": 0.05,
        "trading_max_concurrent_positions": 20,
    }
    async with fake_trade_api("success") as api:
        service = live(MemoryLedger(), api, **settings)
        async with running(clock, service) as (bus, watch):
            risk, limits = service.risk, service.risk.limits
            per_trade = capital * limits.max_position_fraction
            per_token = capital * limits.max_token_exposure_fraction
            total = capital * limits.max_total_exposure_fraction
            mints = [await ready(bus, market) for _ in range(7)]

            def within_the_limits() -> None:
                assert risk.total_exposure <= total * (1 + 1e-9)
                for mint in mints:
                    assert risk.exposure(mint) <= per_token * (1 + 1e-9), mint

            for mint in mints:
                await publish(bus, market.prediction(mint, score=1.0))
                within_the_limits()
            requests = {r.mint: r for r in watch.payloads("order.requested")}
            assert 5 <= len(requests) < len(mints)  # the total limit ended the burst
            await answered(service, api, len(requests))
            fees = service.settings.execution()
            slipped = 1 + service.settings.trading_slippage_pct / 100
            for call in api.requests:
                # the trade moves the order's SOL and the whole slippage into the curve
                moved = call.body["amount"] * slipped
                await publish(
                    bus,
                    market.tokens.buy(
                        call.body["mint"],
                        WALLET,
                        sol=moved * (1 + fees.curve_fee_rate),
                        signature=call.signature,
                    ),
                )
                within_the_limits()
            fills = {f.mint: f for f in watch.payloads("order.filled")}
            assert fills.keys() == requests.keys() and risk.reservations == {}
            for mint, fill in fills.items():
                assert fill.sol_amount > requests[mint].sol_amount * 1.07  # the worst case
                assert fill.sol_amount <= per_trade * (1 + 1e-9)
                assert service.book.exposure(mint) == fill.sol_amount
            assert sum(f.sol_amount for f in fills.values()) <= total * (1 + 1e-9)
        assert len(api.requests) == len(requests)


async def test_a_late_fill_past_a_limit_is_counted_and_logged_and_no_entry_is_admitted(
    clock, market, caplog
):
    """An entry given up as unconfirmed frees its room, and five entries take it (5 SOL
    of capital, 2.5 SOL in all); then the given-up order's trade shows after all. It is
    booked (the wallet holds the tokens), past the total exposure limit: counted by the
    limit, logged as a warning naming the order, the limit and the excess; no entry is
    admitted while over it, the refusal naming it; and nothing is sold (the exit's rules
    sell the position as any other)."""
    capital = 5.0
    settings = {
        "trading_capital_sol": capital,
        "trading_max_risk_per_trade": 0.05,
        "trading_max_concurrent_positions": 20,
        # the confirmation wait passes with no event: a quiet test, not a silent feed
        "trading_max_silence_s": 2 * CONFIRM_S,
    }
    async with fake_trade_api("silent") as api:
        service = live(MemoryLedger(), api, **settings)
        async with running(clock, service) as (bus, watch):
            risk = service.risk
            total = capital * risk.limits.max_total_exposure_fraction
            late = await ready(bus, market)
            await publish(bus, market.prediction(late, score=1.0))
            [given_up] = watch.payloads("order.requested")
            await answered(service, api)
            [given_up_call] = api.requests
            await clock.advance(CONFIRM_S + 1)
            [refused] = watch.payloads("order.rejected")
            assert refused.reason.startswith("unconfirmed: signature")
            assert risk.reservations == {}

            api.behaviour = "success"
            for _ in range(5):
                await publish(bus, market.prediction(await ready(bus, market), score=1.0))
            await answered(service, api, 6)
            for call in api.requests[1:]:
                amount = call.body["amount"]
                await publish(
                    bus,
                    market.tokens.buy(
                        call.body["mint"], WALLET, sol=amount, signature=call.signature
                    ),
                )
            assert service.book.open_count == 5 and risk.reservations == {}
            before = risk.total_exposure
            assert before <= total

            caplog.set_level(logging.WARNING, logger="pumpflow.trading")
            caplog.clear()
            await publish(
                bus,
                market.tokens.buy(
                    late, WALLET, sol=given_up.sol_amount, signature=given_up_call.signature
                ),
            )
            [fill] = [f for f in watch.payloads("order.filled") if f.order_id == given_up.order_id]
            assert service.book.holds(late) and service.book.exposure(late) == fill.sol_amount
            excess = before + fill.sol_amount - total
            assert risk.total_exposure - total == pytest.approx(excess) and excess > 0
            assert service.metrics.fills_over_limit("total_exposure") == 1
            for other in ("per_trade", "token_exposure", "positions"):
                assert service.metrics.fills_over_limit(other) == 0, other
            [warning] = [r for r in caplog.records if given_up.order_id in r.getMessage()
                         and r.levelno == logging.WARNING]  # fmt: skip
            said = warning.getMessage()
            assert "total exposure" in said and f"by {excess:.4f} SOL" in said, said

            extra = await ready(bus, market)
            await publish(bus, market.prediction(extra, score=1.0))
            assert [r.mint for r in watch.payloads("order.requested")].count(extra) == 0
            assert "over the total exposure limit" in service.engine.last_decision.reasons[0].text
            assert service.skipped["over the total exposure limit"] == 1
            assert all(r.body["action"] == "buy" for r in api.requests)
            assert service.book.sales == {}


async def test_sales_whose_trades_show_before_their_answers_fill_by_their_own_signatures(
    clock, market
):
    """Two sales of a position in flight, the second's trade on the stream before either
    answer: a trade is an order's once its answer names it, else the first sale would
    take the second's trade and the second sale's own trade, showing later, no order."""
    async with fake_trade_api("success") as api, entered(clock, market, api) as run:
        opened = await bought(run, api, market)
        held = opened.token_amount
        api.behaviour = "slow"
        sales = {}
        for n, share in ((1, 0.7), (2, 0.3)):
            sale = ExitOrder(
                order_id=f"{opened.position_id}:exit:{n}",
                mint=opened.mint,
                position_id=opened.position_id,
                token_amount=held * share,
            )
            await publish(run.bus, make_event(sale, source="exit/t", time=clock.now()))
            sales[n] = sale
        await eventually(lambda: len(api.requests) == 3, what="both sales' calls")
        call = {round(r.body["amount"] / held, 1): r for r in api.requests[1:]}
        first, second = call[0.7], call[0.3]

        def trade(sold) -> Event:
            tokens = sold.body["amount"]
            return market.tokens.sell(run.mint, WALLET, tokens=tokens, signature=sold.signature)

        await publish(run.bus, trade(second))
        api.answer()
        await answered(run.service, api, 3)
        await clock.advance(run.service.settings.trading_tick_s)
        await publish(run.bus, trade(first))
        await clock.advance(run.service.settings.trading_tick_s)
        fills = {f.order_id: f for f in run.watch.payloads("order.filled") if f.side == "sell"}
        assert fills.keys() == {sales[1].order_id, sales[2].order_id}
        assert fills[sales[1].order_id].signature == first.signature
        assert fills[sales[1].order_id].token_amount == pytest.approx(held * 0.7)
        assert fills[sales[2].order_id].signature == second.signature
        assert not run.service.book.holds(run.mint)
        await clock.advance(CONFIRM_S + 1)
        assert run.watch.count("order.rejected") == 0
        assert len(api.requests) == 3


async def test_a_trade_made_by_hand_while_the_answer_is_awaited_fills_no_order(clock, market):
    """The wallet trades the token by hand while the entry's call awaits its answer:
    that trade is not the entry's, whose own trade (the answer's signature) fills it."""
    async with fake_trade_api("slow") as api, entered(clock, market, api) as run:
        await eventually(lambda: len(api.requests) == 1, what="the entry's call")
        [call] = api.requests
        by_hand = market.tokens.buy(run.mint, WALLET, sol=0.05)
        await publish(run.bus, by_hand)
        api.answer()
        await answered(run.service, api)
        await clock.advance(run.service.settings.trading_tick_s)
        assert run.watch.count("order.filled") == 0
        ours = market.tokens.buy(
            run.mint, WALLET, sol=run.request.sol_amount, signature=call.signature
        )
        await publish(run.bus, ours)
        [fill] = run.watch.payloads("order.filled")
        assert fill.order_id == run.request.order_id and fill.signature == call.signature
        assert fill.token_amount == ours.data.tokenAmount
        assert len(api.requests) == 1


async def test_an_error_answer_rejects_the_order_which_is_never_sent_again(clock, market, caplog):
    caplog.set_level(logging.DEBUG)
    async with fake_trade_api("error") as api, entered(clock, market, api) as run:
        service = run.service
        await answered(service, api)
        await clock.advance(service.settings.trading_tick_s)
        [rejected] = run.watch.payloads("order.rejected")
        assert "Simulation failed" in rejected.reason
        order = await order_of(run.ledger)
        assert order["state"] == "rejected" and order["signature"] is None
        assert service.risk.reservations == {}
        # the prediction again (a redelivery) and time: still one call
        await publish(run.bus, run.prediction)
        await clock.advance(CONFIRM_S + 1)
        assert len(api.requests) == 1 and run.watch.count("order.rejected") == 1
    assert KEY not in caplog.text


async def test_a_throttled_call_is_refused_at_once_whatever_its_body(clock, market):
    """A 429 (here a proxy's text, no JSON) was turned away before anything was signed:
    the order is rejected at once, saying so (a sale may then be asked again), never
    held as unknown for the whole confirmation wait."""
    async with fake_trade_api("throttled") as api, entered(clock, market, api) as run:
        service = run.service
        await answered(service, api)
        await clock.advance(service.settings.trading_tick_s)
        [rejected] = run.watch.payloads("order.rejected")
        assert rejected.reason == "trade API refused: HTTP 429: Too Many Requests"
        order = await order_of(run.ledger)
        assert order["state"] == "rejected" and order["outcome"] == rejected.reason
        assert service.risk.reservations == {}
        assert len(api.requests) == 1


@pytest.mark.parametrize(
    ("side", "market_moved", "cause", "failures"),
    [
        # a falling token's sale: the market, not execution; the breaker does not count it
        ("sell", True, "slippage", 0),
        # entries chasing a market that outruns them count
        ("buy", True, "slippage", 1),
        # a sale refused on a market that stayed put failed otherwise, and counts
        ("sell", False, None, 1),
    ],
)
async def test_a_refusal_on_a_market_past_the_orders_limit_is_slippage_counted_for_buys_only(
    clock, market, side, market_moved, cause, failures
):
    async with (
        fake_trade_api("success" if side == "sell" else "held") as api,
        entered(clock, market, api, trading_live_answer_timeout_s=9.0) as run,
    ):
        service, mint = run.service, run.mint
        if side == "sell":
            opened = await bought(run, api, market)
            api.behaviour = "held"
            await sell_all(run, opened, clock, reason="stop loss")
        calls = 2 if side == "sell" else 1
        await eventually(lambda: len(api.requests) == calls, what="the held call")
        if market_moved:
            # the stream shows the market past the limit before the refusal comes back
            if side == "sell":
                move = market.tokens.sell(mint, "alice")  # her 3 SOL's worth
            else:
                move = market.tokens.buy(mint, "whale", sol=5.0)
            await publish(run.bus, move)
        assert service.risk.consecutive_failures == 0
        api.answer()
        await answered(service, api, calls)
        await clock.advance(service.settings.trading_tick_s)
        [rejected] = run.watch.payloads("order.rejected")
        assert rejected.side == side and rejected.reason.startswith("trade API refused")
        assert rejected.cause == cause
        assert ("over the" in rejected.reason) is (cause == "slippage")
        assert service.risk.consecutive_failures == failures


async def test_no_answer_leaves_the_outcome_unknown_then_unconfirmed_never_resent(clock, market):
    async with fake_trade_api("timeout") as api, entered(clock, market, api) as run:
        service = run.service
        await answered(service, api)
        await clock.advance(service.settings.trading_tick_s)
        order = await order_of(run.ledger)
        assert order["state"] == "unknown" and "no answer" in order["outcome"]
        assert run.watch.count("order.rejected") == 0
        assert service.risk.reservations.keys() == {order["order_id"]}

        await clock.advance(CONFIRM_S)
        [rejected] = run.watch.payloads("order.rejected")
        assert rejected.reason.startswith("unconfirmed: no answer from the trade API")
        assert (await order_of(run.ledger))["state"] == "rejected"
        assert len(api.requests) == 1


async def test_a_stop_while_the_answer_is_awaited_stores_the_outcome_unknown_and_says_so(
    clock, market, caplog
):
    """``pumpflow stop`` (or any stop) cuts the call off: the trade API may have sent the
    transaction, so the order is told unknown, in the ledger and the log, not left
    ``sent`` without a signature as if it had been answered."""
    async with fake_trade_api("slow") as api:
        async with entered(clock, market, api, trading_live_answer_timeout_s=3.0) as run:
            await eventually(lambda: len(api.requests) == 1, what="the trade API's call")
        api.answer()
    order = await order_of(run.ledger)
    assert order["state"] == "unknown", order
    assert order["outcome"] == "the service stopped before the trade API answered"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(order["order_id"] in line and "stopped before" in line for line in said)
    assert KEY not in caplog.text


async def test_an_accepted_answer_without_a_signature_leaves_the_outcome_unknown(clock, market):
    """A 200 naming no signature and no error: the transaction may have left, so the
    order is not refused (its capital released while the wallet may hold the tokens,
    booked to nothing); it waits for its trade, which fills it."""
    async with fake_trade_api("unsigned") as api, entered(clock, market, api) as run:
        service = run.service
        await answered(service, api)
        await clock.advance(service.settings.trading_tick_s)
        order = await order_of(run.ledger)
        assert order["state"] == "unknown" and order["signature"] is None, order
        assert run.watch.count("order.rejected") == 0
        assert service.risk.reservations.keys() == {order["order_id"]}
        ours = market.tokens.buy(run.mint, WALLET, sol=run.request.sol_amount)
        await publish(run.bus, ours)
        [fill] = run.watch.payloads("order.filled")
        assert fill.order_id == run.request.order_id and service.book.holds(run.mint)
        assert len(api.requests) == 1


async def test_an_answer_that_never_ends_is_no_answer_within_the_answer_timeout(clock, market):
    """Each read of the body comes within the read timeout, the body never ends: the
    answer's wait is bounded as a whole, the order's outcome unknown, never resent."""
    async with fake_trade_api("trickle") as api, entered(clock, market, api) as run:
        service = run.service
        await eventually(
            lambda: len(api.requests) == 1 and not service.executor.calls,
            within=10 * service.settings.trading_live_answer_timeout_s,
            what="the call given up",
        )
        await clock.advance(service.settings.trading_tick_s)
        order = await order_of(run.ledger)
        assert order["state"] == "unknown" and "no answer" in order["outcome"]
        assert len(api.requests) == 1


async def test_no_answer_then_the_wallets_trade_on_the_token_fills_the_order(clock, market):
    async with fake_trade_api("timeout") as api, entered(clock, market, api) as run:
        await answered(run.service, api)
        ours = market.tokens.buy(run.mint, WALLET, sol=run.request.sol_amount)
        await publish(run.bus, ours)
        [fill] = run.watch.payloads("order.filled")
        assert fill.order_id == run.request.order_id
        assert fill.signature == ours.data.signature
        order = await order_of(run.ledger)
        assert order["state"] == "filled" and order["signature"] == ours.data.signature
        assert len(api.requests) == 1


async def test_a_signature_whose_trade_never_shows_ends_unconfirmed(clock, market):
    async with fake_trade_api("silent") as api, entered(clock, market, api) as run:
        service, request, mint = run.service, run.request, run.mint
        await answered(service, api)
        [sent] = api.requests
        await publish(run.bus, market.tokens.buy(mint, "bob", sol=1.0))
        await clock.advance(CONFIRM_S - 1)
        assert run.watch.count("order.rejected") == 0  # still within the wait
        await clock.advance(1.0)
        [rejected] = run.watch.payloads("order.rejected")
        assert rejected.order_id == request.order_id
        assert rejected.reason.startswith(f"unconfirmed: signature {sent.signature}")
        order = await order_of(run.ledger)
        assert order["state"] == "rejected" and order["signature"] == sent.signature
        assert service.risk.reservations == {} and not service.book.holds(mint)
        assert len(api.requests) == 1

        # the stream shows it after all: the chain is the truth, booked late
        await publish(
            run.bus,
            market.tokens.buy(mint, WALLET, sol=request.sol_amount, signature=sent.signature),
        )
        [fill] = run.watch.payloads("order.filled")
        assert fill.order_id == request.order_id and service.book.holds(mint)
        assert (await order_of(run.ledger))["state"] == "filled"
        assert len(api.requests) == 1


async def test_a_trade_showing_after_its_order_was_given_up_and_a_restart_is_booked_late(
    clock, market
):
    """An entry given up as unconfirmed, then a restart: its signature's trade showing
    after all (a frame the stream delivered late) is the chain's truth, booked late by
    the replica that trades now, as by the one that gave it up."""
    async with fake_trade_api("silent") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
            await clock.advance(CONFIRM_S + 1)
            [rejected] = first.watch.payloads("order.rejected")
            assert rejected.reason.startswith("unconfirmed: signature")
        request, ledger, mint = first.request, first.ledger, first.mint
        [sent] = api.requests

        second = live(ledger, api)
        async with running(clock, second) as (bus, watch):
            assert second.reconciled == {}
            ours = market.tokens.buy(mint, WALLET, sol=request.sol_amount, signature=sent.signature)
            await publish(bus, ours)
            [fill] = watch.payloads("order.filled")
            assert fill.order_id == request.order_id and fill.signature == sent.signature
            assert second.book.holds(mint)
            assert (await order_of(ledger))["state"] == "filled"
        assert len(api.requests) == 1


async def test_a_restart_waits_for_the_order_in_flight_and_never_sends_it_again(clock, market):
    async with fake_trade_api("silent") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
        request, ledger = first.request, first.ledger
        [sent] = api.requests
        order = await order_of(ledger)
        assert order["state"] == "sent" and order["signature"] == sent.signature

        second = live(ledger, api)
        async with running(clock, second) as (bus, watch):
            assert second.reconciled == {request.order_id: "resubmitted"}
            await publish(bus, first.prediction)  # a redelivery: never a second order
            assert watch.count("order.requested") == 0
            await publish(
                bus,
                market.tokens.buy(
                    first.mint, WALLET, sol=request.sol_amount, signature=sent.signature
                ),
            )
            [fill] = watch.payloads("order.filled")
            assert fill.order_id == request.order_id
        assert len(api.requests) == 1


async def test_a_take_over_fills_an_order_without_answer_by_its_own_trade_not_a_hand_trade(
    clock, market
):
    """The entry's answer was lost and the replica went: the next one waits for the
    order's trade. The wallet's hand buy of the token (another size) is not the order's
    and fills nothing; the buy of the order's size does."""
    async with fake_trade_api("timeout") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
            await clock.advance(first.service.settings.trading_tick_s)
        request, ledger, mint = first.request, first.ledger, first.mint
        order = await order_of(ledger)
        assert order["state"] == "unknown" and order["signature"] is None

        second = live(ledger, api)
        async with running(clock, second) as (bus, watch):
            assert second.reconciled == {request.order_id: "resubmitted"}
            await clock.advance(1.0)
            await publish(bus, market.tokens.buy(mint, WALLET, sol=request.sol_amount / 10))
            assert watch.count("order.filled") == 0 and not second.book.holds(mint)
            assert second.risk.reservations.keys() == {request.order_id}
            ours = market.tokens.buy(mint, WALLET, sol=request.sol_amount)
            await publish(bus, ours)
            [fill] = watch.payloads("order.filled")
            assert fill.order_id == request.order_id
            assert fill.signature == ours.data.signature
            assert fill.token_amount == ours.data.tokenAmount
            assert (await order_of(ledger))["state"] == "filled"
        assert len(api.requests) == 1


async def test_a_paper_restart_books_no_paper_fill_for_a_live_order_in_flight(clock, market):
    """Live trading stops with an entry in flight and the service comes back on paper:
    the order is the chain's (its outcome unknown here), so paper neither fills it at a
    paper price nor holds its capital; it is rejected, saying why."""
    async with fake_trade_api("silent") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
        request, ledger, mint = first.request, first.ledger, first.mint

    paper = TradingService(
        TradingSettings.load(service="trading", transport="memory"),
        registry=CollectorRegistry(),
        ledger=ledger,
    )
    async with running(clock, paper) as (bus, watch):
        assert paper.reconciled == {request.order_id: "rejected"}
        await publish(bus, market.tokens.buy(mint, "bob", sol=0.2))
        await clock.advance(paper.settings.trading_tick_s + 1.0)
        assert watch.count("order.filled") == 0 and not paper.book.holds(mint)
        assert paper.risk.reservations == {}
        order = await order_of(ledger)
        assert order["state"] == "rejected" and "live executor" in order["outcome"]
    assert len(api.requests) == 1


async def test_a_paper_restart_warns_that_the_wallet_may_hold_a_live_orders_trade(
    clock, market, caplog
):
    """The live order rejected on paper may have traded on chain: the operator is told,
    with its signature, to look at the wallet, as nothing here ever will."""
    async with fake_trade_api("silent") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
    [sent] = api.requests
    caplog.clear()
    paper = TradingService(
        TradingSettings.load(service="trading", transport="memory"),
        registry=CollectorRegistry(),
        ledger=first.ledger,
    )
    async with running(clock, paper):
        pass
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        first.request.order_id in line
        and sent.signature in line
        and "the live wallet may hold its trade" in line
        for line in warned
    ), warned
    assert KEY not in caplog.text


async def test_the_wallets_trade_a_failed_batch_left_undecided_fills_its_order(clock, market):
    """Postgres fails while the wallet's trade waits behind a change to store: the bus
    hands the trade back alone, and a later trade of the token, in a batch that ran
    first, must not make its view refuse it as a redelivery (the wallet bought, yet the
    order would end unconfirmed)."""
    ledger = BlinkingLedger()
    async with fake_trade_api("success") as api:
        service = live(ledger, api)
        async with run_embedded([service], clock=clock, synchronous=False) as system:
            bus = system.bus
            watch = await EventCollector("watch").attach(bus, "order.*", "position.*")
            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            [requested] = await watch.wait_for(1, "order.requested")
            request = requested.data
            await answered(service, api)
            [call] = api.requests
            # the tick cannot store the call's signature: the change waits
            ledger.failures, ledger.held = 2, asyncio.Event()
            await clock.advance(service.settings.trading_tick_s)
            ours = market.tokens.buy(mint, WALLET, sol=request.sol_amount, signature=call.signature)
            await publish(bus, ours)
            await eventually(lambda: ledger.holding, what="the wallet's trade storing")
            await publish(bus, market.tokens.buy(mint, "bob", sol=0.1))
            await eventually(lambda: service._lock._waiters, what="the later trade waiting")
            ledger.held.set()
            [filled] = await watch.wait_for(1, "order.filled")
            fill = filled.data
            assert fill.order_id == request.order_id and fill.signature == call.signature
            assert service.book.holds(mint)
            await clock.advance(2 * CONFIRM_S)
            await bus.drain()
            assert watch.count("order.rejected") == 0
            assert (await order_of(ledger))["state"] == "filled"
        assert len(api.requests) == 1


class _HeldStore(MemoryStateStore):
    """The in-memory store, its writes waiting while ``held`` is set and not released."""

    held: asyncio.Event | None = None
    holding = False

    async def write(self, batch) -> None:
        if self.held is not None:
            self.holding = True
            await self.held.wait()
        await super().write(batch)


async def test_a_view_is_not_stored_ahead_of_the_ledger_so_the_next_holder_fills_the_order(
    clock, market
):
    """The views' write shared with another lane's handler begins after the wallet's
    trade was decided but not stored (Postgres down): the view must not say the trade
    was folded in, else the replica taking over (the lease lost meanwhile) refuses it as
    a redelivery, and the order the wallet filled ends unconfirmed."""
    ledger, store = BlinkingLedger(), _HeldStore(clock)
    async with fake_trade_api("success") as api:
        first = live(ledger, api, trading_keep_token_views=True)
        async with running(clock, first, store=store) as (bus, watch):
            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            [request] = watch.payloads("order.requested")
            await answered(first, api)
            [call] = api.requests
            other = await ready(bus, market)
            store.held = asyncio.Event()
            another_lane = asyncio.create_task(first.on_events([market.features(other)]))
            await eventually(lambda: store.holding, what="the views' write")
            ledger.failures = 1_000_000
            ours = market.tokens.buy(mint, WALLET, sol=request.sol_amount, signature=call.signature)
            with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
                await first.on_events([ours])
            assert first.book.holds(mint)  # in memory only
            store.held.set()
            await another_lane
            # the write that takes the trade's view next
            with contextlib.suppress(asyncpg.exceptions.ConnectionDoesNotExistError):
                await first.context.save(first.engine.views)
        ledger.failures = 0
        second = live(ledger, api, trading_keep_token_views=True)
        async with running(clock, second, store=store) as (bus, watch):
            await publish(bus, ours)  # never acknowledged: delivered again
            [fill] = watch.payloads("order.filled")
            assert fill.order_id == request.order_id and fill.signature == call.signature
            assert second.book.holds(mint)
        assert len(api.requests) == 1


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ({"trading_live_enabled": False}, "not enabled"),
        ({"pumpportal_api_key": None}, "API key"),
        ({"trading_live_wallet": None}, "TRADING_LIVE_WALLET"),
    ],
)
def test_live_refuses_to_start_without_its_switch_key_and_wallet(missing, message, monkeypatch):
    monkeypatch.delenv("PUMPPORTAL_API_KEY", raising=False)
    monkeypatch.delenv("PUMPPORTAL_API_KEY_FILE", raising=False)
    api = FakeTradeApi(url="http://127.0.0.1:9/api/trade")
    with pytest.raises(SettingsError, match=message) as failure:
        live(MemoryLedger(), api, **missing)
    assert KEY not in str(failure.value)


def test_serving_live_without_its_switch_is_one_line_and_exit_2(monkeypatch, capsys):
    """A refusal of the settings together, like one of a setting alone: no traceback."""
    settings = TradingSettings.load(
        service="trading", transport="memory", http_port=0, trading_executor="live"
    )
    assert asyncio.run(run_service(TradingService, settings)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "pumpflow trading: the live executor is chosen but not enabled: set "
        "PUMPFLOW_TRADING_LIVE_ENABLED=true to trade real money"
    )


async def test_a_sale_showing_late_after_a_take_over_never_sells_the_next_position(clock, market):
    """A sale given up as unconfirmed, then a take-over; another sale closes the position
    and the token is entered again. The first sale's trade then shows late: it is booked
    for the position it was sent for, closed, and the new position keeps every token."""
    async with fake_trade_api("silent") as api:
        async with entered(clock, market, api) as first:
            opened = await bought(first, api, market)
            given_up = await sell_all(first, opened, clock, reason="take profit")
            await answered(first.service, api, 2)
            await clock.advance(CONFIRM_S + 1)
            [rejected] = first.watch.payloads("order.rejected")
            assert rejected.order_id == given_up.order_id
        ledger, mint = first.ledger, first.mint
        late = api.requests[1]

        second = live(ledger, api)
        async with running(clock, second) as (bus, watch):
            assert second.book.position(mint).position_id == opened.position_id
            sale = ExitOrder(
                order_id=f"{opened.position_id}:exit:2",
                mint=mint,
                position_id=opened.position_id,
                token_amount=opened.token_amount,
            )
            await publish(bus, make_event(sale, source="exit/t", time=clock.now()))
            await answered(second, api, 3)
            await publish(
                bus,
                market.tokens.sell(
                    mint, WALLET, tokens=opened.token_amount, signature=api.requests[2].signature
                ),
            )
            [closed] = watch.payloads("position.closed")
            assert closed.position_id == opened.position_id

            # the token as the next holder learns it (no store of views here)
            await ready(bus, market, mint)
            await publish(bus, market.prediction(mint))
            [_, entry] = watch.payloads("order.requested")
            await answered(second, api, 4)
            await publish(
                bus,
                market.tokens.buy(
                    mint, WALLET, sol=entry.sol_amount, signature=api.requests[3].signature
                ),
            )
            [reentered] = watch.payloads("position.opened")
            assert reentered.position_id != opened.position_id

            await publish(
                bus,
                market.tokens.sell(
                    mint, WALLET, tokens=opened.token_amount, signature=late.signature
                ),
            )
            fills = [f for f in watch.payloads("order.filled") if f.side == "sell"]
            assert [f.order_id for f in fills] == [sale.order_id, given_up.order_id]
            assert fills[1].position_id == opened.position_id
            held = second.book.position(mint)
            assert held.position_id == reentered.position_id
            assert held.tokens == reentered.token_amount
            assert [c.position_id for c in watch.payloads("position.closed")] == [
                opened.position_id
            ]
            assert second.metrics.unbooked_trades("sale_of_closed_position") == 1
            stored = {p["position_id"]: p for p in await ledger.positions(open_only=True, limit=9)}
            assert stored[reentered.position_id]["token_amount"] == reentered.token_amount
        assert len(api.requests) == 4


async def test_a_wallet_trade_matching_no_order_is_logged_counted_and_shown(clock, market, caplog):
    """The entry's answer never comes and its buy lands after the price fell past its
    slippage: it fills nothing, and the operator learns that the wallet holds tokens the
    book does not (a log line, a metric, the HTTP views), as the order ends unconfirmed
    naming the trade."""
    import httpx

    from pumpflow.common.runtime.http import create_app

    async with fake_trade_api("timeout") as api, entered(clock, market, api) as run:
        service = run.service
        await answered(service, api)
        cheaper = market.tokens.buy(run.mint, WALLET, sol=run.request.sol_amount / 1.5)
        with caplog.at_level(logging.ERROR, logger="pumpflow.trading"):
            await publish(run.bus, cheaper)
        assert run.watch.count("order.filled") == 0 and not service.book.holds(run.mint)
        signature = cheaper.data.signature
        assert service.metrics.unbooked_trades("wallet_trade") == 1
        [line] = [r.getMessage() for r in caplog.records if "matches no order" in r.getMessage()]
        assert signature in line and run.request.order_id in line

        app = create_app(service, service._ctx)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for path in ("/orders", f"/orders?mint={run.mint}", "/positions"):
                [shown] = (await http.get(path)).json()["unbooked_wallet_trades"]
                assert shown["signature"] == signature and shown["side"] == "buy"
                assert shown["tokens"] == cheaper.data.tokenAmount
                assert shown["candidates"] == [run.request.order_id]
            other = (await http.get("/orders?mint=another")).json()
            assert other["unbooked_wallet_trades"] == []

        await clock.advance(CONFIRM_S + 1)
        [rejected] = run.watch.payloads("order.rejected")
        assert rejected.order_id == run.request.order_id and signature in rejected.reason
        assert len(api.requests) == 1


async def test_the_wallets_trade_of_a_fill_stored_before_a_take_over_is_not_unbooked(clock, market):
    """The replica stored the fill of the wallet's trade and went before the trade's
    delivery was acknowledged: the next one is handed the trade again. It is the booked
    order's, the wallet and the book agree: nothing is booked twice, and nothing is told
    unbooked (a critical alert for the operator to settle what needs no settling)."""
    async with fake_trade_api("success") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
            [call] = api.requests
            sol = first.request.sol_amount
            ours = market.tokens.buy(first.mint, WALLET, sol=sol, signature=call.signature)
            await publish(first.bus, ours)
            [opened] = first.watch.payloads("position.opened")
        ledger, mint = first.ledger, first.mint

        second = live(ledger, api)
        async with running(clock, second) as (bus, watch):
            await publish(bus, ours)  # never acknowledged: delivered again
            assert watch.count("order.filled") == 0
            assert second.book.open_positions[mint].tokens == opened.token_amount
            assert second.metrics.unbooked_trades("wallet_trade") == 0
            assert await second.unbooked_view() == []
        assert len(api.requests) == 1


async def test_an_unbooked_trade_delivered_again_to_the_next_holder_is_not_unbooked_again(
    clock, market
):
    """The replica stored a wallet trade of no order as unbooked and went before the
    trade's delivery was acknowledged: the next one, handed the trade again, knows it
    from the ledger. It is judged once: not counted, logged nor claimed again."""
    async with fake_trade_api("timeout") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
            cheaper = market.tokens.buy(first.mint, WALLET, sol=first.request.sol_amount / 1.5)
            await publish(first.bus, cheaper)
            assert first.service.metrics.unbooked_trades("wallet_trade") == 1
        ledger = first.ledger

        second = live(ledger, api)
        async with running(clock, second) as (bus, watch):
            await publish(bus, cheaper)  # never acknowledged: delivered again
            assert second.metrics.unbooked_trades("wallet_trade") == 0
            assert watch.count("order.filled") == 0
            [shown] = await second.unbooked_view()
            assert shown["signature"] == cheaper.data.signature


async def test_the_late_fill_of_an_order_given_up_takes_a_seq_of_its_own(clock, market, pg_pool):
    """An entry given up as unconfirmed, then its trade shows late: the fill's event has
    the id of the order's outcome, as its refusal had, and goes out with the mint's next
    seq, not the refusal's (the exit's consumer would drop it as a copy)."""
    from pumpflow.trading.ledger import PostgresLedger

    async with fake_trade_api("silent") as api:
        service = live(PostgresLedger(pg_pool), api)
        async with running(clock, service) as (bus, watch):
            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            [request] = watch.payloads("order.requested")
            await answered(service, api)
            [sent] = api.requests
            await clock.advance(CONFIRM_S + 1)
            [refusal] = watch.of("order.rejected", key=mint)
            sol = request.sol_amount
            await publish(bus, market.tokens.buy(mint, WALLET, sol=sol, signature=sent.signature))
            [fill] = watch.of("order.filled", key=mint)
            assert fill.id == refusal.id and fill.data.order_id == request.order_id
            seqs = [e.seq for e in watch.of(key=mint) if e.type.startswith(("order.", "position."))]
            assert seqs == list(range(1, len(seqs) + 1)) and fill.seq > refusal.seq


async def test_a_sale_refused_at_a_take_over_that_trades_late_is_booked_late(clock, market):
    """A sale sent with its signature, then a take-over that finds its position closed
    (the ledger booked the position's tokens sold meanwhile): the sale is refused, and
    remembered by its signature. Its trade showing late is its late fill, booked to no
    position, counted as a sale of a closed position and listed naming its order, not
    taken for a trade of no order."""
    async with fake_trade_api("silent") as api:
        async with entered(clock, market, api) as first:
            opened = await bought(first, api, market)
            sale = await sell_all(first, opened, clock, reason="take profit")
            await answered(first.service, api, 2)
        ledger, mint = first.ledger, first.mint
        sent = api.requests[1]
        elsewhere = OrderRecord(
            order_id=f"{opened.position_id}:exit:0", mint=mint, side="sell", sol_amount=None,
            token_amount=opened.token_amount, slippage_pct=1.0, reason="by hand",
            position_id=opened.position_id, cause_id=None, executor="live", state="filled",
            requested_at=clock.now(), venue="curve",
        )  # fmt: skip
        fill = OrderFilled(
            order_id=elsewhere.order_id, mint=mint, side="sell", position_id=opened.position_id,
            token_amount=opened.token_amount, sol_amount=0.1, price=1e-8, fee_sol=0.0,
        )  # fmt: skip
        await ledger.commit(
            LedgerChange(orders=[elsewhere], fills=[FillRecord.of(fill, time=clock.now())])
        )

        second = live(ledger, api)
        async with running(clock, second) as (bus, watch):
            assert second.reconciled == {sale.order_id: "rejected"}
            refused = {o["order_id"]: o for o in await ledger.orders(limit=10)}[sale.order_id]
            assert refused["state"] == "rejected" and refused["signature"] == sent.signature
            await publish(
                bus,
                market.tokens.sell(
                    mint, WALLET, tokens=opened.token_amount, signature=sent.signature
                ),
            )
            [late] = watch.payloads("order.filled")
            assert late.order_id == sale.order_id and late.signature == sent.signature
            assert second.metrics.unbooked_trades("wallet_trade") == 0
            assert second.metrics.unbooked_trades("sale_of_closed_position") == 1
            [shown] = await second.unbooked_view()
            assert shown["signature"] == sent.signature and shown["order_id"] == sale.order_id
            assert shown["side"] == "sell" and shown["candidates"] == []
            assert not second.book.holds(mint)
            stored = {o["order_id"]: o for o in await ledger.orders(limit=10)}
            assert stored[sale.order_id]["state"] == "filled"
        assert len(api.requests) == 2


async def test_an_unbooked_trade_outlives_a_take_over_until_the_operator_acknowledges_it(
    clock, market
):
    """A wallet trade that matched no order, then a take-over: the next holder shows it
    (it is in the ledger, not only in the memory of the replica that saw it), still
    names it in the refusal of the order it may be, and forgets it once the operator,
    with the API token, acknowledges it."""
    import httpx

    from pumpflow.common.runtime.http import create_app

    async with fake_trade_api("timeout") as api:
        async with entered(clock, market, api) as first:
            await answered(first.service, api)
            cheaper = market.tokens.buy(first.mint, WALLET, sol=first.request.sol_amount / 1.5)
            await publish(first.bus, cheaper)
            assert first.service.metrics.unbooked_trades("wallet_trade") == 1
        ledger, signature, request = first.ledger, cheaper.data.signature, first.request

        second = live(ledger, api, api_token="s3cret")
        async with running(clock, second) as (_, watch):
            app = create_app(second, second._ctx)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                for path in ("/orders", "/positions"):
                    [shown] = (await http.get(path)).json()["unbooked_wallet_trades"]
                    assert shown["signature"] == signature
                    assert shown["candidates"] == [request.order_id]
                await clock.advance(CONFIRM_S + 1)
                [refused] = watch.payloads("order.rejected")
                assert refused.order_id == request.order_id and signature in refused.reason

                body = {"signatures": [signature]}
                denied = await http.post("/unbooked/acknowledge", json=body)
                assert denied.status_code == 401
                assert len((await http.get("/orders")).json()["unbooked_wallet_trades"]) == 1
                auth = {"Authorization": "Bearer s3cret"}
                done = await http.post("/unbooked/acknowledge", json=body, headers=auth)
                assert done.status_code == 200, done.text
                assert done.json() == {"acknowledged": 1, "unbooked_wallet_trades": []}
                assert (await http.get("/positions")).json()["unbooked_wallet_trades"] == []
        assert await ledger.unbooked(since=0.0, limit=10) == []
        assert len(api.requests) == 1


async def test_an_order_sent_once_postgres_is_back_waits_its_full_confirmation_from_the_send(
    clock, market
):
    """An entry decided while Postgres is away is stored and sent once it is back, past
    the confirmation wait counted from its decision: its trade is awaited from the send,
    not given up unconfirmed while its call is in flight (the answer's signature would
    name no order, and the wallet's buy would be booked to nothing)."""
    ledger = BlinkingLedger()
    async with fake_trade_api("slow") as api:
        service = live(ledger, api)
        async with running(clock, service) as (bus, watch):
            mint = await ready(bus, market)
            ledger.failures = 1_000_000
            with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
                await service.on_events([market.prediction(mint)])
            await clock.advance(CONFIRM_S + 1)
            assert api.requests == []
            ledger.failures = 0
            await clock.advance(service.settings.trading_tick_s)
            [request] = watch.payloads("order.requested")
            await eventually(lambda: len(api.requests) == 1, what="the entry's call")
            assert watch.count("order.rejected") == 0
            api.answer()
            await answered(service, api)
            [call] = api.requests
            ours = market.tokens.buy(mint, WALLET, sol=request.sol_amount, signature=call.signature)
            await publish(bus, ours)
            [fill] = watch.payloads("order.filled")
            assert fill.order_id == request.order_id and fill.signature == call.signature
            assert service.book.holds(mint) and watch.count("order.rejected") == 0
            assert service.metrics.unbooked_trades("wallet_trade") == 0
        assert len(api.requests) == 1


async def test_a_trade_its_answer_settled_is_booked_by_a_replica_standing_by_before_a_tick(
    clock, market
):
    """The entry's trade shows before its answer, which then settles it; the replica
    stands by before its next timed round. The fill is stored as it stands by: the
    trade's delivery was acknowledged, so the next holder never sees it again and would
    give the order up unconfirmed while the wallet holds its tokens."""
    async with fake_trade_api("slow") as api:
        async with entered(clock, market, api) as first:
            await eventually(lambda: len(api.requests) == 1, what="the entry's call")
            [call] = api.requests
            request = first.request
            ours = market.tokens.buy(
                first.mint, WALLET, sol=request.sol_amount, signature=call.signature
            )
            await publish(first.bus, ours)
            api.answer()
            await answered(first.service, api)
        ledger, mint = first.ledger, first.mint
        order = await order_of(ledger)
        assert order["state"] == "filled" and order["signature"] == call.signature

        second = live(ledger, api)
        async with running(clock, second) as (_, watch):
            assert second.reconciled == {}
            assert second.book.holds(mint) and second.risk.reservations == {}
            await clock.advance(CONFIRM_S + 1)
            assert watch.count("order.rejected") == 0
        assert len(api.requests) == 1


async def test_a_trade_showing_while_the_answer_is_awaited_is_booked_by_a_replica_standing_by(
    clock, market
):
    """The entry's trade shows while its call awaits the answer; the replica stands by,
    cutting the call short. No answer will come: the trade, consistent with the order,
    is its fill, stored as the replica stands by (its delivery was acknowledged, and the
    next holder would give the order up unconfirmed while the wallet holds its tokens)."""
    async with fake_trade_api("slow") as api:
        async with entered(clock, market, api) as first:
            await eventually(lambda: len(api.requests) == 1, what="the entry's call")
            [call] = api.requests
            request = first.request
            ours = market.tokens.buy(
                first.mint, WALLET, sol=request.sol_amount, signature=call.signature
            )
            await publish(first.bus, ours)
            assert first.watch.count("order.filled") == 0
        ledger, mint = first.ledger, first.mint
        order = await order_of(ledger)
        assert order["state"] == "filled" and order["signature"] == call.signature

        second = live(ledger, api)
        async with running(clock, second):
            assert second.reconciled == {}
            assert second.book.holds(mint) and second.risk.reservations == {}
        assert len(api.requests) == 1


@pytest.mark.parametrize("answer", ["never came", "came"])
async def test_a_trade_showing_before_its_answer_is_booked_after_its_replica_died(
    clock, market, pg_pool, answer
):
    """The entry's trade shows while its call awaits the answer, and its delivery is
    acknowledged; the replica dies before it stores the fill (its answer never came, or
    came and settled the trade in memory only). The next holder, which never sees that
    trade on the stream again, fills the order from the trade the ledger kept: booked
    once, never sent again, not given up unconfirmed while the wallet holds the tokens.
    (The take-over fences the dead replica off the ledger, as after a kill -9.)"""
    from pumpflow.trading.ledger import PostgresLedger

    ledger = PostgresLedger(pg_pool)
    async with fake_trade_api("slow") as api:
        first = live(ledger, api)
        async with running(clock, first) as (bus, _):
            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            await eventually(lambda: len(api.requests) == 1, what="the entry's call")
            [call] = api.requests
            [order] = await ledger.orders(limit=5)
            sol = order["sol_amount"]
            ours = market.tokens.buy(mint, WALLET, sol=sol, signature=call.signature)
            await publish(bus, ours)  # handled and acknowledged
            if answer == "came":
                api.answer()
                await answered(first, api)
                # the next event stores the signature; the fill waits for the next round
                await publish(bus, market.tokens.buy(mint, "bob", sol=0.1))
                [order] = await ledger.orders(limit=5)
                assert order["signature"] == call.signature
            assert (await ledger.orders(limit=5))[0]["state"] == "sent"

            second = live(ledger, api, trading_predecessor_wait_s=0.05)
            async with running(clock, second) as (bus2, watch2):
                assert second.reconciled == {order["order_id"]: "filled"}
                assert second.book.holds(mint) and second.risk.reservations == {}
                [stored] = await ledger.orders(limit=5)
                assert stored["state"] == "filled" and stored["signature"] == call.signature
                snapshot = await ledger.load(remembered=10)
                [fill] = snapshot.fills
                assert fill.order_id == order["order_id"] and fill.signature == call.signature
                assert fill.token_amount == ours.data.tokenAmount

                await publish(bus2, ours)  # delivered again: the same fill, not a second
                await clock.advance(CONFIRM_S + 1)
                assert watch2.count("order.filled") == 0 and watch2.count("order.rejected") == 0
                assert second.metrics.unbooked_trades("wallet_trade") == 0
                assert await second.unbooked_view() == []
            api.answer()
        # the dead replica's memory is refused by the ledger: nothing booked twice
        assert len((await ledger.load(remembered=10)).fills) == 1
        assert len(api.requests) == 1
