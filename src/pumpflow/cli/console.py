"""A bus subscriber that shows a person what the embedded system is doing."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import Clock
from pumpflow.common.events import (
    Event,
    FeaturesUpdated,
    FeedSubscription,
    ModelPrediction,
    OrderRejected,
    PositionClosed,
    PositionOpened,
    TokenCreated,
    TokenLifecycle,
    TokenMigrated,
)
from pumpflow.common.text import counted
from pumpflow.report.results import UNMARKED, unmarked_note


def position_pnl(position: Position) -> str:
    """An open position's PnL in SOL, realised and at its mark; unmarked while no trade
    has marked it (its worth is unknown, not its cost)."""
    return f"{position.pnl_sol:+.4f} SOL" if position.marked else UNMARKED


def no_order_line(reasons: Mapping[str, int]) -> str:
    """Why predictions ordered nothing, by reason (trading's, numbers left out); one
    refused for several reasons counts under each."""
    return "predictions without an order, by reason (each under every reason it had): " + (
        "; ".join(f"{reason} x{n}" for reason, n in reasons.items()) or "none"
    )


def msgspec_line(data: object) -> str:
    """A payload's fields as ``name=value`` pairs, those it leaves unset (None) left out;
    a list of records (a barrier's positions, say) by its length, which a line has room
    for."""
    fields = getattr(data, "__struct_fields__", ())
    values = ((name, getattr(data, name)) for name in fields)
    return " ".join(f"{name}={_short(value)}" for name, value in values if value is not None)


def _short(value: object) -> str:
    if isinstance(value, list | tuple) and any(hasattr(v, "__struct_fields__") for v in value):
        return str(len(value))
    return repr(value)


if TYPE_CHECKING:
    from pumpflow.common.runtime.embedded import EmbeddedSystem
    from pumpflow.common.trading.positions import Position

_WATCHED = (
    "token.created",
    "token.trade",
    "token.migrated",
    "token.lifecycle",
    "features.updated",
    "feed.subscription",
    "model.prediction",
    "order.*",
    "position.*",
    "trading.*",
)
_SHOWN_FEATURES = ("market_cap_sol", "curve_progress", "trades_per_minute", "return_60s")


@dataclass(slots=True)
class _Token:
    symbol: str
    state: str = "new"
    features: dict[str, float] = field(default_factory=dict)
    #: the live arm's latest score
    score: float | None = None


class Console:
    """Count and print the events of an embedded run."""

    def __init__(
        self,
        *,
        system: EmbeddedSystem,
        clock: Clock,
        speed: float,
        out: TextIO = sys.stdout,
        verbose: bool = False,
    ):
        self.system = system
        self.clock = clock
        self.speed = speed
        self.out = out
        self.verbose = verbose
        self.started_at = clock.now()
        self.counts: Counter[str] = Counter()
        self.tokens: dict[str, _Token] = {}
        self.graduated: list[str] = []
        self.unsubscribed = 0
        self.max_subscribed = 0
        self._last_trades = 0
        self._last_at = self.started_at

    def symbols(self) -> dict[str, str]:
        """Each seen token's symbol, by mint."""
        return {mint: token.symbol for mint, token in self.tokens.items()}

    async def attach(self) -> None:
        await self.system.bus.subscribe(
            Subscription(service="console", patterns=_WATCHED, handler=self.on_event)
        )

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def market_clock(self) -> str:
        seconds = int(self.clock.now() - self.started_at)
        return f"+{seconds // 60:02d}:{seconds % 60:02d}"

    async def on_event(self, event: Event) -> None:
        self.counts[event.type] += 1
        data = event.data
        if isinstance(data, TokenCreated):
            self.tokens[data.mint] = _Token(symbol=data.symbol.strip() or data.mint[:6])
            # the feed subscribes to a token as it launches: the most are counted then,
            # not only at the status lines
            self.subscribed()
            if self.verbose:
                self._say(
                    f"{self.market_clock()} created {data.symbol.strip():<10} {data.mint} "
                    f"creator buy {data.solAmount or 0:.3f} SOL"
                )
        elif isinstance(data, TokenMigrated):
            token = self.tokens.get(data.mint)
            self.graduated.append(data.mint)
            self._say(
                f"{self.market_clock()} GRADUATED {token.symbol if token else data.mint} "
                f"-> {data.pool}"
            )
        elif isinstance(data, TokenLifecycle):
            token = self.tokens.get(data.mint)
            if token is not None:
                token.state = data.state
            if self.verbose:
                self._say(
                    f"{self.market_clock()} {token.symbol if token else data.mint:<10} "
                    f"{data.previous_state} -> {data.state} ({data.reason})"
                )
        elif isinstance(data, FeaturesUpdated):
            token = self.tokens.get(data.mint)
            if token is not None:
                token.features = dict(zip(data.names, data.values, strict=True))
        elif isinstance(data, ModelPrediction) and not data.shadow:
            token = self.tokens.get(data.mint)
            if token is not None:
                token.score = data.score
        elif isinstance(data, PositionOpened | PositionClosed):
            token = self.tokens.get(data.mint)
            name = token.symbol if token else data.mint
            if isinstance(data, PositionOpened):
                self._say(
                    f"{self.market_clock()} BOUGHT {name:<10} {data.cost_sol:.3f} SOL "
                    f"at {data.entry_price:.3e} SOL/token"
                )
            else:
                self._say(
                    f"{self.market_clock()} SOLD {name:<10} realised "
                    f"{data.realized_pnl_sol:+.4f} SOL ({data.reason})"
                )
        elif isinstance(data, OrderRejected) and self.verbose:
            self._say(f"{self.market_clock()} order {data.order_id} rejected: {data.reason}")
        elif event.type.startswith("trading."):
            self._say(f"{self.market_clock()} TRADING {event.type}: {msgspec_line(data)}")
        elif isinstance(data, FeedSubscription) and data.action == "unsubscribe":
            self.unsubscribed += len(data.mints)

    def subscribed(self) -> int:
        """Mints the feed streams trades of now (the most seen is kept for the summary)."""
        feed = self.system.services.get("feed")
        socket = getattr(feed, "socket", None)
        subscribed = len(socket.active_mints) if socket is not None else 0
        self.max_subscribed = max(self.max_subscribed, subscribed)
        return subscribed

    def status_line(self) -> str:
        now = self.clock.now()
        trades = self.counts["token.trade"]
        rate = (trades - self._last_trades) / max(1e-9, (now - self._last_at))
        self._last_trades, self._last_at = trades, now
        subscribed = self.subscribed()
        states = Counter(t.state for t in self.tokens.values())
        lifecycle = " ".join(
            f"{s} {states[s]}" for s in ("new", "active", "declining", "inactive", "graduated")
        )
        return (
            f"{self.market_clock()} tokens {len(self.tokens)} | trades {trades} "
            f"({rate:.0f}/s market) | trade subscriptions {subscribed} | {lifecycle}"
        )

    def top_lines(self, n: int = 3) -> list[str]:
        live = [t for t in self.tokens.values() if t.features and t.state in ("new", "active")]
        live.sort(key=lambda t: t.features.get("market_cap_sol", 0.0), reverse=True)
        lines = []
        for token in live[:n]:
            f = token.features
            lines.append(
                f"    {token.symbol:<10} mcap {f.get('market_cap_sol', 0):7.1f} SOL  "
                f"curve {f.get('curve_progress', 0):6.1%}  "
                f"{f.get('trades_per_minute', 0):5.0f} trades/min  "
                f"60s {f.get('return_60s', 0):+7.1%}  "
                + ("" if token.score is None else f"score {token.score:.2f}  ")
                + f"[{token.state}]"
            )
        return lines

    def trading_line(self) -> str | None:
        """Positions and PnL after every fee, from the trading service, when it runs."""
        trading = self.system.services.get("trading")
        if trading is None or getattr(trading, "risk", None) is None:
            return None
        pnl = trading.pnl()
        return (
            f"    trading [{trading.risk.state}] positions {pnl['open_positions']} open, "
            f"{pnl['closed_positions']} closed; exposure {pnl['exposure_sol']:.3f} SOL; "
            f"PnL realised {pnl['realized_pnl_sol']:+.4f} unrealised "
            f"{pnl['unrealized_pnl_sol']:+.4f} SOL{unmarked_note(trading.book.unmarked_count)} "
            f"(fees {pnl['fees_sol']:.4f})"
        )

    def position_lines(self, n: int = 5) -> list[str]:
        trading = self.system.services.get("trading")
        if trading is None:
            return []
        held = sorted(trading.book.open_positions.values(), key=lambda p: p.pnl_sol, reverse=True)
        lines = []
        for position in held[:n]:
            token = self.tokens.get(position.mint)
            worth = position.mark_value_sol  # None: not marked yet
            lines.append(
                f"      {token.symbol if token else position.mint:<10} cost "
                f"{position.cost_sol:.3f} SOL  worth {'-' if worth is None else f'{worth:.3f}'}"
                f"  PnL {position_pnl(position)}"
            )
        return lines

    async def status_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self._say(self.status_line())
            for line in self.top_lines():
                self._say(line)
            trading = self.trading_line()
            if trading is not None:
                self._say(trading)
                for line in self.position_lines():
                    self._say(line)

    def print_summary(self) -> None:
        c = self.counts
        trading = self.trading_line()
        if trading is not None:
            self._say(
                f"trading: {counted(c['order.requested'], 'order')}, {c['order.filled']:,} "
                f"filled, {c['order.rejected']:,} rejected; "
                f"{counted(c['position.opened'], 'position')} opened, "
                f"{c['position.closed']:,} closed"
            )
            self._say(trading.strip())
            for line in self.position_lines(n=20):
                self._say(line)
            reasons = self.system.services["trading"].pnl()["no_order_reasons"]
            if reasons:
                self._say(no_order_line(reasons))
        market_s = self.clock.now() - self.started_at
        self._say(
            f"run over: {market_s / 60:.1f} market minutes at {self.speed:g}x; "
            f"{counted(c['token.created'], 'token')}, {counted(c['token.trade'], 'trade')}, "
            f"{len(self.graduated):,} graduated; "
            f"{counted(c['features.updated'], 'feature update')}; "
            f"{counted(c['model.prediction'], 'prediction')}; "
            f"{counted(c['token.lifecycle'], 'lifecycle change')}; "
            f"{counted(self.unsubscribed, 'trade subscription')} dropped for inactivity; "
            f"at most {self.max_subscribed:,} subscribed at once"
        )
