"""A self-contained embedded demo: a small market on the in-memory bus, printed live.

A market service creates a few tokens and trades them against the bonding curve
(pumpflow.common.curve does all the maths) at wall-clock pace, in PumpPortal's frame
shapes; a printer service subscribes to ``token.*`` and prints every event with its
price, market cap and curve progress. One token is pushed to completion and migrates.
"""

from __future__ import annotations

import asyncio
import random
import string
import sys
from typing import ClassVar, TextIO

from pumpflow.common import curve
from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import WallClock
from pumpflow.common.events import (
    Event,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
    make_event,
)
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings

_BASE58 = "".join(c for c in string.digits + string.ascii_letters if c not in "0OIl")
_NAMES = ("Cash Elon", "Moon Cat", "Based Frog", "Tiny Whale", "Sol Dog", "Pixel Ape")


class DemoSettings(CommonSettings):
    """Settings of the demo market (set by the command line, not the environment)."""

    demo_tokens: int = 3
    demo_trades_per_s: float = 20.0
    demo_seed: int = 7


def _address(rng: random.Random, length: int = 44, suffix: str = "") -> str:
    body = "".join(rng.choice(_BASE58) for _ in range(length - len(suffix)))
    return body + suffix


class DemoMarket(Service):
    """Creates tokens and trades them against the curve until stopped."""

    name = "demo-market"
    settings_class: ClassVar[type[CommonSettings]] = DemoSettings

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        settings: DemoSettings = ctx.settings  # type: ignore[assignment]
        self.rng = random.Random(settings.demo_seed)
        self.curves: dict[str, curve.CurveState] = {}
        self.holders: dict[str, dict[str, float]] = {}
        self.whale: str | None = None
        self.task = asyncio.create_task(self._run(settings), name="demo-market")

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def _publish(self, payload) -> None:
        event = make_event(payload, source=self.ctx.source, time=self.ctx.clock.now())
        await self.ctx.bus.publish(event)

    async def _create(self) -> None:
        rng = self.rng
        mint = _address(rng, suffix="pump")
        creator = _address(rng)
        state = curve.CurveState()
        buy = curve.quote_buy(state, round(rng.uniform(0.06, 2.0), 9))
        self.curves[mint] = buy.after
        self.holders[mint] = {creator: buy.tokens}
        name = rng.choice(_NAMES)
        symbol = "".join(w[0] for w in name.split()).upper() + rng.choice(string.ascii_uppercase)
        if self.whale is None:
            self.whale = mint
        await self._publish(
            TokenCreated(
                signature=_address(rng, 88),
                mint=mint,
                traderPublicKey=creator,
                txType="create",
                initialBuy=round(buy.tokens, 6),
                solAmount=round(buy.sol, 9),
                bondingCurveKey=_address(rng),
                vTokensInBondingCurve=buy.after.v_tokens,
                vSolInBondingCurve=buy.after.v_sol,
                marketCapSol=buy.after.market_cap_sol,
                name=name,
                symbol=symbol,
                uri=f"https://ipfs.io/ipfs/{_address(rng, 59).lower()}",
                pool="pump",
            )
        )

    async def _trade(self) -> None:
        rng = self.rng
        live = [m for m, s in self.curves.items() if not s.complete]
        if not live:
            return
        # the first token attracts big buyers so the demo shows a graduation
        mint = self.whale if self.whale in live and rng.random() < 0.35 else rng.choice(live)
        state = self.curves[mint]
        holders = self.holders[mint]
        sellers = [h for h, amount in holders.items() if amount > 0]
        if sellers and rng.random() < 0.35:
            trader = rng.choice(sellers)
            tokens = holders[trader] * rng.choice((0.25, 0.5, 1.0))
            quote = curve.quote_sell(state, tokens)
            holders[trader] -= tokens
            side = "sell"
        else:
            trader = _address(rng)
            sol = 6.0 if mint == self.whale else rng.choice((0.01, 0.05, 0.2, 0.5))
            quote = curve.quote_buy(state, sol)
            holders[trader] = holders.get(trader, 0.0) + quote.tokens
            side = "buy"
        self.curves[mint] = quote.after
        await self._publish(
            TokenTrade(
                signature=_address(rng, 88),
                mint=mint,
                traderPublicKey=trader,
                txType=side,
                tokenAmount=round(quote.tokens, 6),
                solAmount=round(quote.sol, 9),
                newTokenBalance=round(holders[trader], 6),
                bondingCurveKey=_address(rng),
                vTokensInBondingCurve=quote.after.v_tokens,
                vSolInBondingCurve=quote.after.v_sol,
                marketCapSol=quote.after.market_cap_sol,
                pool="pump",
            )
        )
        if quote.after.complete:
            await self._publish(
                TokenMigrated(
                    signature=_address(rng, 88), mint=mint, txType="migrate", pool="pump-amm"
                )
            )

    async def _run(self, settings: DemoSettings) -> None:
        for _ in range(settings.demo_tokens):
            await self._create()
        pause = 1.0 / settings.demo_trades_per_s
        while True:
            await asyncio.sleep(pause)
            await self._trade()


class DemoPrinter(Service):
    """Prints every token event with price, market cap and curve progress."""

    name = "demo-printer"
    #: where to print; None is the current sys.stdout
    out: ClassVar[TextIO | None] = None

    async def start(self, ctx: ServiceContext) -> None:
        self.symbols: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        await ctx.bus.subscribe(
            Subscription(service=self.name, patterns=("token.*",), handler=self.handle)
        )

    async def handle(self, event: Event) -> None:
        data = event.data
        self.counts[event.type] = self.counts.get(event.type, 0) + 1
        if isinstance(data, TokenCreated):
            self.symbols[data.mint] = data.symbol
        symbol = self.symbols.get(event.key or "", "?")
        short = f"{data.mint[:4]}…{data.mint[-4:]}"
        if isinstance(data, TokenMigrated):
            print(
                f"{event.type:<15} {symbol:<6} {short}  graduated → {data.pool}",
                file=self.out or sys.stdout,
            )
            return
        state = curve.state_from_frame(data.vSolInBondingCurve, data.vTokensInBondingCurve)
        if isinstance(data, TokenCreated):
            what = f"create {data.name.strip()!r} dev buy {data.solAmount:.3f} SOL"
        else:
            what = f"{data.txType:<4} {data.solAmount:>7.3f} SOL {data.tokenAmount:>14,.0f} tok"
        print(
            f"{event.type:<15} {symbol:<6} {short}  {what:<38}"
            f" price {state.price:.3e} SOL  mcap {state.market_cap_sol:7.2f} SOL"
            f"  progress {state.progress:6.1%}",
            file=self.out or sys.stdout,
        )

    async def stop(self) -> None:
        summary = ", ".join(f"{n} {t}" for t, n in sorted(self.counts.items()))
        print(f"demo over: {summary or 'no events'}", file=self.out or sys.stdout)


async def run_demo(*, duration: float, tokens: int, rate: float, seed: int) -> int:
    """Run the demo for ``duration`` seconds; return 0."""
    overrides = {"demo_tokens": tokens, "demo_trades_per_s": rate, "demo_seed": seed}
    market = DemoMarket(DemoSettings.load(service=DemoMarket.name, transport="memory", **overrides))
    async with run_embedded([DemoPrinter, market], clock=WallClock(), partitions=4):
        await asyncio.sleep(duration)
    return 0
