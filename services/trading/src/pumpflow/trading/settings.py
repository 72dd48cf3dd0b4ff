"""Settings of the trading service (``PUMPFLOW_<NAME>``).

The entry filters, limits and breakers keep the domain's defaults (argued in
:mod:`pumpflow.common.trading.settings`); the settings here are the ones an operator
changes per deployment.

``trading_capital_sol = 10``: paper trading's starting capital. The limits are
fractions of it, so with the defaults a full-confidence entry is 0.4 SOL, within the
0.6 SOL a fresh curve takes at the 2% impact limit, and far above the 0.01 SOL dust
floor: the size a pump.fun trader starting out uses, not a fund's.

Live trading needs three things at once: ``trading_executor = live``,
``trading_live_enabled = true`` and PumpPortal's API key (``PUMPPORTAL_API_KEY`` or
``PUMPPORTAL_API_KEY_FILE``), plus the public key of the key's wallet
(``trading_live_wallet``), whose trades in the token stream confirm the orders (the
service announces it to the feed, which streams its trades whatever tokens it streams:
``trading_live_announce_s``). The
sending and confirming defaults are argued in :mod:`pumpflow.common.trading.settings`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, StringConstraints, TypeAdapter, ValidationError, field_validator

from pumpflow.common.lease import LeaderLeaseConfig
from pumpflow.common.pumpportal import (
    TRADE_API_URL,
    has_signature_form,
    is_public_key,
    redact,
)
from pumpflow.common.runtime.settings import PumpPortalKeySettings, SettingsError
from pumpflow.common.trading import (
    MAX_ENTRY_SLIPPAGE_PCT,
    MAX_PRIORITY_FEE_SOL,
    MIN_LIVE_CONFIRM_S,
    BreakerSettings,
    EntryFilters,
    LiveExecution,
    PaperExecution,
    RiskLimits,
)

_FILTERS = EntryFilters()
_LIMITS = RiskLimits()
_PAPER = PaperExecution()
_BREAKERS = BreakerSettings()
_LIVE = LiveExecution(wallet="-")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: a block list's entry: a blank one is in every name, and would block every token
_Entry = Annotated[str, StringConstraints(pattern=r"\S")]


class TradingSettings(PumpPortalKeySettings):
    """Settings of the trading service."""

    trading_executor: Literal["paper", "live"] = Field(
        "paper", description="who executes orders: paper fills on the curve, or live"
    )
    trading_live_enabled: bool = Field(
        False, description="the explicit switch without which the live executor never starts"
    )
    trading_live_url: str = Field(
        TRADE_API_URL,
        pattern=r"^https?://",
        description="live: PumpPortal's trade API (it signs and sends from the key's wallet)",
    )
    trading_live_wallet: str | None = Field(
        None, description="live: public key of the API key's wallet; its trades confirm orders"
    )
    trading_live_priority_fee_sol: float = Field(
        _LIVE.priority_fee_sol,
        ge=0,
        le=MAX_PRIORITY_FEE_SOL,
        description="live: the trade API's priorityFee, SOL a transaction (at most the "
        "smallest order's SOL)",
    )
    trading_live_answer_timeout_s: float = Field(
        _LIVE.answer_timeout_s,
        gt=0,
        description="live: wall seconds to wait for the API's answer; then the order's "
        "outcome is unknown (never sent again)",
    )
    trading_live_confirm_s: float = Field(
        _LIVE.confirm_s,
        gt=0,
        description="live: seconds an order waits for its trade in the token's stream "
        f"before it is rejected as unconfirmed (live: at least {MIN_LIVE_CONFIRM_S:g}, the "
        "longest a transaction can still land)",
    )
    trading_live_announce_s: float = Field(
        30.0,
        gt=0,
        description="live: seconds between announcements of the wallet to the feed "
        "(feed.subscription accounts), which streams its trades whatever mints it streams",
    )
    trading_capital_sol: float = Field(
        10.0, gt=0, description="capital the limits are fractions of (paper: the start)"
    )
    trading_max_risk_per_trade: float = Field(
        _LIMITS.max_risk_per_trade, gt=0, le=1, description="capital risked per trade"
    )
    trading_max_concurrent_positions: int = Field(
        _LIMITS.max_concurrent_positions, ge=1, description="tokens held at once"
    )
    trading_max_position_fraction: float = Field(
        _LIMITS.max_position_fraction, gt=0, le=1, description="share of capital one entry buys"
    )
    trading_max_token_exposure_fraction: float = Field(
        _LIMITS.max_token_exposure_fraction,
        gt=0,
        le=1,
        description="share of capital one token may hold (entries added included)",
    )
    trading_max_total_exposure_fraction: float = Field(
        _LIMITS.max_total_exposure_fraction,
        gt=0,
        le=1,
        description="share of capital held in tokens at once",
    )
    trading_max_daily_loss_fraction: float = Field(
        _LIMITS.max_daily_loss_fraction,
        gt=0,
        le=1,
        description="share of capital the UTC day's realised loss may reach; then trading "
        "only reduces until the next UTC day",
    )
    trading_add_to_positions: bool = Field(
        _LIMITS.add_to_positions,
        description="buy more of a token held, up to its exposure limit (default: one entry)",
    )
    trading_reentry_cooldown_s: float = Field(
        _LIMITS.reentry_cooldown_s,
        ge=0,
        # an infinite one is no JSON for /limits: no re-entry is a long one (a day: 86400)
        allow_inf_nan=False,
        description="seconds after a token's position closed before it may be entered again "
        "(default: at once, if the filters admit it)",
    )
    trading_min_score: float = Field(
        _FILTERS.min_score, ge=0, le=1, description="model score an entry needs"
    )
    trading_reject_creator_sold: bool = Field(
        _FILTERS.reject_creator_sold, description="never enter a token whose creator sold"
    )
    trading_name_blocklist: tuple[_Entry, ...] = Field(
        (), description="substrings of names or symbols never entered (JSON list)"
    )
    trading_creator_blocklist: tuple[_Entry, ...] = Field(
        (), description="creator wallets whose tokens are never entered (JSON list)"
    )
    trading_slippage_pct: float = Field(
        _PAPER.slippage_pct,
        gt=0,
        description="slippage limit of entries, percent (5: 5%; live: the trade API's "
        f"slippage, at most {MAX_ENTRY_SLIPPAGE_PCT:g})",
    )
    trading_paper_latency_s: float = Field(
        _PAPER.latency_s, ge=0, description="paper: from an order to the state it fills on"
    )
    trading_max_feed_lag_s: float = Field(
        _BREAKERS.max_feed_lag_s,
        gt=0,
        description="an event older than this trips the stale breaker (a backlog: after a "
        "restart, what waited in the queues)",
    )
    trading_max_silence_s: float = Field(
        _BREAKERS.max_silence_s,
        gt=0,
        description="market seconds with no event at all that trip the stale breaker (a feed "
        "that stopped delivering)",
    )
    trading_max_token_silence_s: float = Field(
        _BREAKERS.max_token_silence_s,
        gt=0,
        description="market seconds with no event of most active tokens (80%, of 10 or "
        "more) that trip the stale breaker (their trade subscriptions lost)",
    )
    trading_max_events_per_s: float = Field(
        _BREAKERS.max_events_per_s,
        gt=0,
        description="events a second trading consumes (about three a trade; a market "
        "event past the feed lag limit is the stale breaker's and not counted), over "
        f"{_BREAKERS.rate_window_s:g} s, that trip the rate breaker (a replay loop, a flood)",
    )
    trading_tick_s: float = Field(
        1.0, gt=0, description="market seconds between the timed checks (breakers, due fills)"
    )
    trading_window: int = Field(
        64,
        ge=1,
        le=4096,
        description="deliveries of one lane applied in one call, in order, their token views "
        "stored in one write before they are acknowledged (1: one at a time, each event "
        "waiting for the write of the one before)",
    )
    trading_lease_ttl_s: float = Field(
        10.0,
        gt=0,
        description="TTL (wall-clock seconds) of the lease 'trading:decide' that lets one "
        "replica trade; a standby takes over within it after a crash",
    )
    trading_predecessor_wait_s: float = Field(
        2.0,
        ge=0,
        description="wall seconds a replica taking over waits for the one that traded before "
        "to stand by, when that one may have stored orders it did not send: it withdraws "
        "them as it does; past the wait they are taken as sent (as after a crash) and it "
        "can store nothing more",
    )
    trading_halt_store_wait_s: float = Field(
        2.0,
        gt=0,
        description="wall seconds a halt waits to be stored in the ledger before it answers "
        "that it is not yet (applied here at once all the same, and stored once Postgres "
        "takes it), and as long again for its announcement (published once the broker "
        "takes it); a resume, once stored, waits as long to apply and be announced (a "
        "round under way, or a broker blocking publishers, holds them; they follow)",
    )
    trading_keep_token_views: bool | None = Field(
        None,
        description="store the token views for a replica taking over; default: where the "
        "lease is shared with other replicas (not in a one-process run on a market clock, "
        "which no replica can take over)",
    )
    trading_context_ttl_s: float = Field(
        21_600.0,
        gt=0,
        description="how long a token's view (name, market, lifecycle, features, prediction) "
        "stays in the state store after its last change, for a replica taking over",
    )
    trading_remembered_orders: int = Field(
        100_000, ge=1, description="order ids loaded on start against a second send"
    )

    @field_validator("trading_live_wallet")
    @classmethod
    def _a_public_key(cls, wallet: str | None) -> str | None:
        """A wallet the stream never shows leaves every order's trade unbooked (its tokens
        unsold), and a private key given for it would be logged: neither is taken, and
        the value is not repeated."""
        if wallet is None or is_public_key(wallet):
            return wallet
        if has_signature_form(wallet):
            raise ValueError(
                "64 bytes long, as a private key is: give the wallet's public key (32 to 44 "
                "base58 characters), and keep the private key out of every setting"
            )
        raise ValueError("not a public key (32 to 44 base58 characters)")

    @field_validator("trading_live_url")
    @classmethod
    def _keeps_the_key_secret(cls, url: str) -> str:
        """The key goes in the URL's query as the request leaves: never over plain HTTP
        but to this machine (a local fake), and never in the setting itself."""
        parts = urlsplit(url)
        if parts.query:
            raise ValueError(
                "the trade API's URL carries a query: give the key in PUMPPORTAL_API_KEY "
                "(or PUMPPORTAL_API_KEY_FILE), not in the URL"
            )
        if parts.scheme == "http" and not _loopback(parts.hostname or ""):
            raise ValueError(
                "http:// sends the API key in clear text: use https:// (plain http only to "
                "this machine, 127.0.0.1 or localhost)"
            )
        return url

    def live_refusal(self) -> str | None:
        """Why the live executor chosen would not start (None: it would, or paper is)."""
        if self.trading_executor != "live":
            return None
        if not self.trading_live_enabled:
            return (
                "the live executor is chosen but not enabled: set "
                "PUMPFLOW_TRADING_LIVE_ENABLED=true to trade real money"
            )
        try:
            key = self.api_key()
        except SettingsError as exc:
            return str(exc)
        if key is None:
            return f"the live executor needs PumpPortal's API key: {self.no_key()}"
        if self.trading_slippage_pct > MAX_ENTRY_SLIPPAGE_PCT:
            return (
                f"PUMPFLOW_TRADING_SLIPPAGE_PCT: {self.trading_slippage_pct:g} is over the "
                f"{MAX_ENTRY_SLIPPAGE_PCT:g}% a live entry may pay over its price (a percent: "
                "5 is 5%)"
            )
        if self.trading_live_confirm_s < MIN_LIVE_CONFIRM_S:
            return (
                f"PUMPFLOW_TRADING_LIVE_CONFIRM_S: {self.trading_live_confirm_s:g} is under "
                f"the {MIN_LIVE_CONFIRM_S:g} s a live order must wait for its trade: a Solana "
                "transaction can land until its blockhash expires (150 blocks, 60 to 90 s), "
                "and an order given up before that frees its capital while its trade may "
                "still land, a position the book would not know"
            )
        if not self.trading_live_wallet:
            return (
                "the live executor needs the public key of the API key's wallet, whose "
                "trades confirm its orders: set PUMPFLOW_TRADING_LIVE_WALLET"
            )
        return None

    def executor_line(self) -> tuple[int, str]:
        """What the start says of who executes orders (live: once :meth:`live_refusal`
        has none), and at what level: live is never taken for paper, nor paper with a
        live setting given for live."""
        if self.trading_executor == "live":
            return logging.WARNING, (
                f"trading LIVE: orders go to {redact(self.trading_live_url)} and trade real "
                f"money from the wallet {self.trading_live_wallet} (entry slippage "
                f"{self.trading_slippage_pct:g}%, priority fee "
                f"{self.trading_live_priority_fee_sol:g} SOL a transaction)"
            )
        paper = "trading on paper: orders fill on the curve, no money moves"
        if self.trading_live_enabled:
            return logging.WARNING, (
                f"{paper}. PUMPFLOW_TRADING_LIVE_ENABLED is true, but "
                "PUMPFLOW_TRADING_EXECUTOR is paper: set it to live to trade real money"
            )
        given = [
            name
            for name, value in (
                ("PumpPortal's API key", self.key_given()),
                ("PUMPFLOW_TRADING_LIVE_WALLET", self.trading_live_wallet),
            )
            if value
        ]
        if given:
            return logging.INFO, (
                f"{paper}; {' and '.join(given)} {'is' if len(given) == 1 else 'are'} set and "
                "not used (live: PUMPFLOW_TRADING_EXECUTOR=live and "
                "PUMPFLOW_TRADING_LIVE_ENABLED=true)"
            )
        return logging.INFO, paper

    def start_line(self) -> str | None:
        refusal = self.live_refusal()
        if refusal is not None:
            return f"trading would not start: {refusal}"
        return self.executor_line()[1]

    def filters(self) -> EntryFilters:
        return replace(
            _FILTERS,
            min_score=self.trading_min_score,
            reject_creator_sold=self.trading_reject_creator_sold,
            name_blocklist=tuple(self.trading_name_blocklist),
            creator_blocklist=tuple(self.trading_creator_blocklist),
        )

    def limits(self) -> RiskLimits:
        return replace(
            _LIMITS,
            max_position_fraction=self.trading_max_position_fraction,
            max_token_exposure_fraction=self.trading_max_token_exposure_fraction,
            max_total_exposure_fraction=self.trading_max_total_exposure_fraction,
            max_daily_loss_fraction=self.trading_max_daily_loss_fraction,
            add_to_positions=self.trading_add_to_positions,
            reentry_cooldown_s=self.trading_reentry_cooldown_s,
        )

    def breakers(self) -> BreakerSettings:
        return replace(
            _BREAKERS,
            max_feed_lag_s=self.trading_max_feed_lag_s,
            max_silence_s=self.trading_max_silence_s,
            max_token_silence_s=self.trading_max_token_silence_s,
            max_events_per_s=self.trading_max_events_per_s,
        )

    def execution(self) -> PaperExecution:
        return replace(
            _PAPER, latency_s=self.trading_paper_latency_s, slippage_pct=self.trading_slippage_pct
        )

    def live_execution(self) -> LiveExecution:
        return LiveExecution(
            wallet=self.trading_live_wallet or "",
            priority_fee_sol=self.trading_live_priority_fee_sol,
            answer_timeout_s=self.trading_live_answer_timeout_s,
            confirm_s=self.trading_live_confirm_s,
            fees=self.execution(),
        )

    def risk_limits(self) -> RiskLimits:
        """Every risk limit as the settings give them (:meth:`limits` with the risk per
        trade and the positions held at once)."""
        return replace(
            self.limits(),
            max_risk_per_trade=self.trading_max_risk_per_trade,
            max_concurrent_positions=self.trading_max_concurrent_positions,
        )

    def lease_config(self, *, name: str, holder: str) -> LeaderLeaseConfig:
        return LeaderLeaseConfig(name=name, holder=holder, ttl_s=self.trading_lease_ttl_s)


#: the risk limits an operator may change on a running system (``PUT /limits``), each
#: bounded as its setting ``PUMPFLOW_TRADING_<NAME>`` is
OPERATOR_LIMITS = (
    "max_risk_per_trade",
    "max_concurrent_positions",
    "max_position_fraction",
    "max_token_exposure_fraction",
    "max_total_exposure_fraction",
    "max_daily_loss_fraction",
    "add_to_positions",
    "reentry_cooldown_s",
)

#: a risk limit's value: a fraction or seconds, a count (int), or a switch (bool)
LimitValue = float | int | bool


def _limit_type(name: str) -> type:
    return TradingSettings.model_fields[f"trading_{name}"].annotation


@functools.cache
def _limit_adapter(name: str) -> TypeAdapter:
    """A validator of the limit ``name`` by its setting's own type and bounds."""
    field = TradingSettings.model_fields[f"trading_{name}"]
    return TypeAdapter(Annotated[field.annotation, *field.metadata])


def operator_limit_names(names: Iterable[str]) -> list[str]:
    """``names`` of limits an operator may change, each once in the order given;
    ValueError naming those unknown."""
    names = list(dict.fromkeys(names))
    unknown = sorted(set(names) - set(OPERATOR_LIMITS))
    if unknown:
        raise ValueError(
            f"unknown limits: {', '.join(unknown)} (known: {', '.join(OPERATOR_LIMITS)})"
        )
    return names


def operator_limits(values: Mapping[str, Any]) -> dict[str, LimitValue]:
    """``values`` (limit name -> value, as JSON gives them) checked as their settings
    are, each in its setting's type; ValueError naming the names unknown, or each value
    out of its setting's bounds or of another type (a switch takes true or false alone,
    a number no text nor switch, a count no fraction)."""
    operator_limit_names(values)
    if not values:
        raise ValueError(f"no limit to change (known: {', '.join(OPERATOR_LIMITS)})")
    checked: dict[str, LimitValue] = {}
    wrong = []
    for name, value in values.items():
        if _limit_type(name) is bool:
            # 0, 1 or "false" is a mistake, not a switch
            if isinstance(value, bool):
                checked[name] = value
            else:
                wrong.append(f"{name}: true or false, not {_as_json(value)}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            # "0.1" from JSON is a mistake, not a number
            wrong.append(f"{name}: a number, not {_as_json(value)}")
            continue
        try:
            checked[name] = _limit_adapter(name).validate_python(value)
        except ValidationError as exc:
            wrong.append(f"{name}: {exc.errors()[0]['msg'].lower()}, not {_as_json(value)}")
    if wrong:
        raise ValueError("; ".join(wrong))
    return checked


def _as_json(value: Any) -> str:
    """``value`` as the JSON that gave it (true, null, "60"; Infinity as Python's parser
    takes it), as the operator wrote it, not as Python writes it (True, None, '60')."""
    return json.dumps(value)


def stored_limit(name: str, value: float) -> LimitValue:
    """The limit ``name``'s ``value`` as a number column holds it (a switch 1 or 0) in
    its setting's type."""
    kind = _limit_type(name)
    return value != 0 if kind is bool else kind(value)


def limit_text(value: LimitValue) -> str:
    """A limit's value in words: true or false, or the number."""
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"
