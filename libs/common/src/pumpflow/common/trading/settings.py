"""Settings of trading's domain: entry filters, risk limits, breakers, paper execution.

Every default is argued from the market figures in docs/market.md; the figures a
default rests on are computed with :mod:`pumpflow.common.curve` from the launch
reserves (30 SOL, 1.073B tokens).

Entry filters (:class:`EntryFilters`):

- ``min_score = 0.6``: the model's score is read as the probability of its positive
  label. A round trip pays 1.25% curve fee and 1% trade-API fee each way (~4.5%) plus
  the entry's own impact twice, so a coin flip loses; 0.6 asks for a clear edge.
  Not from market data: to be tuned by the backtests the issue's measures ask for.
- ``min_age_s = 10``: PumpPortal announces a token before an ordinary RPC node can
  read its curve, and bot users complain of sells failing right after buys; 10 s is
  also the features' shortest window, so the vector has seen a window's trades.
- ``max_age_s = 240``: graduates take a median 4.4 minutes (264 s) from launch; an
  entry later than that is behind the graduates' pace, in the 95% of tokens that go
  quiet within 10-15 minutes.
- ``min_curve_progress = 0.05``: 5% of the sellable tokens is ~1.15 SOL raised, more
  than a median creator buy (0.06-2 SOL; 2 SOL alone is 8.4%), so others are buying.
- ``max_curve_progress = 0.8``: past 80% the price is already 6x launch and the rest
  of the curve pays at most 2.45x; it is the lifecycle's urgent (close to graduating)
  band, where late buyers are the early ones' exit.
- ``max_creator_holding_share = 0.05``: creator buys of 0.06-2 SOL hold 0.2-6.6% of
  supply; 5% is a 1.5 SOL launch buy, whose sale alone (after 2 SOL more of buys)
  drops the price ~10%, twice the round trip's fees.
- ``reject_creator_sold = True``: a creator selling is the rug users ask filters for.
- ``min_buy_volume_sol_60s = 2.0``: graduates raise ~85 SOL in 4.4 minutes, ~19 SOL a
  minute; 2 SOL bought in the last minute is ~10% of that pace and 20x the
  lifecycle's active floor (0.1 SOL/min).
- ``min_unique_traders = 10``: the feature counts distinct wallets (buyers and
  sellers; no buyers-only count exists). The active floor is 3; 93 of the top 100
  wallets by volume are bots, and bot-dominated tokens graduate less often, so a
  token only a handful of wallets trade is skipped.
- ``max_top_buyer_share = 0.5``: few, large buys are the best published predictor of
  graduation, so concentration is allowed, up to one wallet having bought half of
  all SOL: its one sale would take back half the curve's demand.
- block lists are empty by default: they are the operator's, not the market's.
- not a setting: a token whose creation trading did not see is not entered. First
  seen by a trade (the wallet's own, made by hand and streamed by the feed; a stream
  joined late), its age and creator's share are counted from that trade.

Risk limits (:class:`RiskLimits`), as fractions of capital:

- ``max_risk_per_trade = 0.02`` with ``assumed_stop_loss = 0.5``: a dump (the
  lifecycle's decline drawdown, 50% from the peak) is the loss a position is sized
  for, so a trade spends at most ``0.02 / 0.5 = 4%`` of capital at full confidence,
  and 25 dumps in a row lose half the capital. Every limit here holds against the most
  an entry order can spend, fees and slippage included (argued in
  :mod:`pumpflow.common.trading.risk`).
- ``max_position_fraction = 0.1`` and ``max_token_exposure_fraction = 0.1``: one
  token never holds more than a tenth of capital (no pyramiding past it).
- ``add_to_positions = False``: one entry per token. The model scores a trading token
  again every half second, so a score that stays high would otherwise buy again and
  again as the price rises (averaging up into a pump, each buy paying its own impact
  and fees); an entry order in flight counts as held.
- ``reentry_cooldown_s = 0``: a token sold out may be entered again at once, if the
  filters admit it (their age window, 10-240 s, already bounds re-entries to a token's
  first four minutes). On the simulator's seeds 6-10, which the model never saw (30
  market minutes each, ``pumpflow run``'s settings, ``pumpflow backtest --config``),
  re-entering paid: PnL after fees +31.09 SOL over 283 entries at once, +24.47 over 252
  with a 60 s cooldown, +23.66 over 251 with no re-entry (a cooldown of an hour); at
  once made the most on four seeds of five (on seed 8 a 60 s cooldown made 0.73 more,
  no re-entry 0.39 more), and the 32 re-entries made about 0.23 SOL each against 0.094
  for a first entry. A trailing stop sells a token that the model still scores high,
  and the next prediction buys it again below its peak. That is the simulated market;
  a trader who takes a stop as the token's end sets a cooldown
  (``PUMPFLOW_TRADING_REENTRY_COOLDOWN_S``). It counts from the latest close among the
  book's last 100 closed positions, which a restart reloads from the ledger.
- ``max_concurrent_positions = 5``, ``max_total_exposure_fraction = 0.5``: five full
  positions at 10% reach the total; half the capital stays in SOL for fees, exits and
  a bad day (over 60% of active addresses lose money).
- ``max_daily_loss_fraction = 0.05``: 2.5 dumps at the per-trade risk; once the UTC
  day's realised PnL (the sales booked since midnight, gains netted against losses) is
  down to it, trading only reduces until the next UTC day. Open positions' marks do
  not count: a position is sized for its dump already, and its sale realises it.
- ``max_entry_price_impact = 0.02``: the entry's impact is paid again on the way out,
  so 2% costs ~4% a round trip, no more than the fees (~4.5%). At launch (30 SOL
  virtual) that is a 0.61 SOL buy; a curve at 60 SOL takes 1.2 SOL.
- ``min_order_sol = 0.01``: many trades are well under 0.01 SOL; those are dust, for
  which the fixed costs of a transaction are out of proportion.
- ``priority_scale``: the share of a full size each lifecycle priority gets: urgent
  (active and hot, or close to graduating) and high (active) trade at full and 3/4,
  normal (new) at half; low (declining) and idle never enter.
- ``min_confidence_scale = 0.5``: a score just at ``min_score`` trades half a size,
  a score of 1 a full one.

Circuit breakers (:class:`BreakerSettings`):

- ``max_curve_error = 1e-6``: live frames keep K and the market cap to ~1e-16;
  lamport and base-unit rounding stays under 1e-10. A larger mismatch is corrupt data.
- ``max_feed_lag_s = 2.0``: a trade reaching trading 2 s after the feed stamped it
  means a backlog; at the graduates' ~1.7 trades/s the curve has moved ~3 trades since.
  A prediction carries its trade's time, so the same limit holds for the model's lag.
- ``max_silence_s = 30``: tokens are created at 16-42 a minute and the feed carries
  every creation; 30 s with no event at all has probability e^-8 at the slowest rate.
- ``max_token_silence_s = 30``, ``silent_tokens_share = 0.8``, ``min_active_tokens =
  10``: the stale breaker trips when at least 80% of the tokens whose lifecycle is
  active, and at least 10 of them, have had no event for 30 s. That is the feed's
  trade subscriptions lost (a reconnection that did not subscribe again) while the
  new-token stream goes on, which the silence of the whole stream never shows. One
  silent token is not a fault: an active token trades at least 6 times a minute
  (``LifecycleThresholds.active_min_trades_per_min``), so at that floor it is silent
  30 s about e^-3 = 5% of the time, and activity makes it declining after 60 s quiet.
  Eight of ten such tokens silent at once by chance is about 45 x 0.05^8, 2e-9 a check
  (and rarer as they trade faster, or as more are active: the market keeps dozens to
  hundreds active). Under 10 active tokens the check is off; the stream's silence
  still watches the feed. A replica taking over watches the tokens active in the
  views it loads, each as heard at the take-over
  (:meth:`~pumpflow.common.trading.TradingEngine.restore`).
- ``max_events_per_s = 1000`` over ``rate_window_s = 10``: the breaker counts every
  event trading consumes, about three a trade (the trade, its features, a prediction
  at most every 0.5 s a token, lifecycle changes: 12,500 events for 4,100 trades on
  the simulator at 1x). The market averages 23-58 trades/s, 70-175 events/s, with
  bursts several times that; 1000/s is 6x the top average over ten seconds. Beyond it
  the data is a replay loop or an attack (``PUMPFLOW_TRADING_MAX_EVENTS_PER_S``).
  A market event past ``max_feed_lag_s`` is not counted: a backlog caught up after a
  restart (two minutes of market read in seconds) is the stale breaker's, not a flood.
- ``max_consecutive_failures = 3``: one failed order is the market (slippage), three
  in a row is the executor or the chain. A sale refused on slippage is the market
  alone and never counts (argued in :mod:`pumpflow.common.trading.risk`).
- ``recovery_s = 60``: a breaker recovers after a minute without its fault, the
  lifecycle's quiet-to-declining time: short against the 4.4-minute graduate window,
  long against a flapping fault.
- ``stale_recovery_s = 10``: the stale breaker's own recovery. Its fault is not an
  incident whose end must be waited for but a measure every event gives again: ten
  seconds of events each within ``max_feed_lag_s`` of the feed (700-1,750 of them at
  the market's 70-175 events/s) show the backlog or the silence is over. A minute
  would halt entries for a minute after every restart, past the catch-up on the
  queues that tripped it (a sixth of a graduate's window lost each time); a lag that
  hovers at the limit trips again at its first late event, so it flaps at most every
  ten seconds, each change reported.
- the ``feed`` breaker has no setting: it trips on the feed's word that PumpPortal
  refuses its trade subscriptions (``feed.trade_stream``) and recovers on its word that
  it takes them, never by time: the refusal lasts until someone funds the key, and the
  feed says so when it changes (argued in :mod:`pumpflow.common.trading.risk`).

Paper execution (:class:`PaperExecution`):

- ``latency_s = 0.5``: sending to PumpPortal and landing in a slot; at the graduates'
  ~1.7 trades/s about one trade gets in first on a hot token.
- ``slippage_pct = 5.0``: :class:`~pumpflow.common.events.OrderRequested`'s default,
  PumpPortal's ``slippage`` in percent. An entry's is above 0, and live at most
  :data:`MAX_ENTRY_SLIPPAGE_PCT` (50): 0 (or a fraction such as 0.05 given for 5%, the
  other settings being fractions) refuses nearly every order, and past 50 an entry may
  pay more than half again the price it was decided on, reserved whole against the
  limits: 500 is a slip of the decimal point, not a strategy. 50 is the most the exit
  pays to get out (its deadline's sweep). Paper takes more: a test or a study may want
  every entry filled whatever the price did.
- ``api_fee_rate = 0.01``: PumpPortal's ``api/trade`` (it signs and sends); its
  ``trade-local`` costs 0.005.
- ``pool_fee_rate = 0.0125``: the reference gives no PumpSwap fee; the curve's is a
  conservative stand-in (see :mod:`pumpflow.common.trading.fills` for the pool).

Live execution (:class:`LiveExecution`, PumpPortal's ``api/trade``):

- ``priority_fee_sol = 0.0001``: PumpPortal's ``priorityFee``, paid per transaction
  whatever its size. It is 0.025% of a full 0.4 SOL entry (against 2.25% of fees each
  way) and 1% of a 0.01 SOL dust-floor order: enough to land in the next slots on a
  hot token without the fixed cost dominating the smallest trade. It is at most
  :data:`MAX_PRIORITY_FEE_SOL`, the smallest order's SOL (``min_order_sol``, 0.01): a
  fee above it costs more than the smallest order it is paid for, and 0.5 given for
  0.0005 would pay a whole entry's SOL on every transaction.
- ``answer_timeout_s = 5``: the API answers with a signature before the transaction
  confirms, so its answer takes a round trip and a simulation, well under a second;
  five seconds without one means the call is lost, and the order's outcome unknown.
- ``confirm_s = 90``: the bounded wait for the wallet's trade in the token's stream.
  The stream is at ``processed`` commitment, so a landed trade shows within seconds;
  a Solana transaction carries a recent blockhash valid for 150 slots (~60 s at
  ~0.4 s a slot) and can never land after it expires. Past 90 s an order whose trade
  has not shown did not land (unless the stream dropped its frame: a trade showing
  later is still booked, see :mod:`pumpflow.common.trading.live`). ``answer_timeout_s``
  must be below it: an answer coming after its order was given up would name a
  signature nothing is kept for, and the wallet's trade would go unbooked.
  It is also the least a live service takes (:data:`MIN_LIVE_CONFIRM_S`): a blockhash
  lives 150 blocks, not a time, and a skipped slot adds no block, so a block comes
  every 0.4 to 0.6 s and the 150 take 60 to 90 s. An order given up before then frees
  its reservation while its transaction may still land: a position bought with capital
  the limits counted free again, which the book learns of only if its trade shows late.
  Paper never reads it (a paper order fills after its latency): any wait is taken there.
- fees (curve, pool, API) are :class:`PaperExecution`'s: the same rates price a live
  fill from the trade the stream shows, and bound what a live buy may cost on top of
  its SOL (:func:`~pumpflow.common.trading.live.live_entry_spend`): the trade of a buy
  whose answer never came costs no more, and the risk manager checks and reserves that
  much against the limits (argued in :mod:`pumpflow.common.trading.risk`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pumpflow.common.curve import FEE_RATE

#: the most an entry's slippage may be, percent (argued in the module docstring)
MAX_ENTRY_SLIPPAGE_PCT = 50.0
#: the least a live order waits for its trade, seconds: the longest a transaction's
#: blockhash lets it land (argued in the module docstring)
MIN_LIVE_CONFIRM_S = 90.0


def _check_fraction(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within 0..1, got {value}")


def _check_positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryFilters:
    """What a token has to show before an entry; defaults argued in the module docstring."""

    min_score: float = 0.6
    min_age_s: float = 10.0
    max_age_s: float = 240.0
    min_curve_progress: float = 0.05
    max_curve_progress: float = 0.8
    max_creator_holding_share: float = 0.05
    reject_creator_sold: bool = True
    min_buy_volume_sol_60s: float = 2.0
    min_unique_traders: int = 10
    max_top_buyer_share: float = 0.5
    #: case-insensitive substrings of a token's name or symbol that block it
    name_blocklist: tuple[str, ...] = ()
    #: creator wallets whose tokens are never entered
    creator_blocklist: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_fraction(
            self,
            "min_score",
            "min_curve_progress",
            "max_curve_progress",
            "max_creator_holding_share",
            "max_top_buyer_share",
        )
        if self.min_curve_progress > self.max_curve_progress:
            raise ValueError("min_curve_progress must not exceed max_curve_progress")
        if not 0.0 <= self.min_age_s <= self.max_age_s:
            raise ValueError("need 0 <= min_age_s <= max_age_s")
        for name in ("name_blocklist", "creator_blocklist"):
            if any(not entry.strip() for entry in getattr(self, name)):
                # a blank name is in every name: it would block every token
                raise ValueError(f"{name} has a blank entry")


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskLimits:
    """Sizing and exposure limits, fractions of capital; defaults argued in the module docstring."""

    max_risk_per_trade: float = 0.02
    max_concurrent_positions: int = 5
    #: the fall from the entry a position is sized for
    assumed_stop_loss: float = 0.5
    max_position_fraction: float = 0.1
    max_token_exposure_fraction: float = 0.1
    max_total_exposure_fraction: float = 0.5
    max_daily_loss_fraction: float = 0.05
    max_entry_price_impact: float = 0.02
    min_order_sol: float = 0.01
    #: buy more of a token held (or with an entry in flight), up to its exposure limit
    add_to_positions: bool = False
    #: seconds after a token's position closed before it may be entered again
    reentry_cooldown_s: float = 0.0
    #: share of a full size per lifecycle priority (IDLE, LOW, NORMAL, HIGH, URGENT)
    priority_scale: tuple[float, ...] = (0.0, 0.0, 0.5, 0.75, 1.0)
    min_confidence_scale: float = 0.5

    def __post_init__(self) -> None:
        _check_fraction(
            self,
            "max_risk_per_trade",
            "max_position_fraction",
            "max_token_exposure_fraction",
            "max_total_exposure_fraction",
            "max_daily_loss_fraction",
            "max_entry_price_impact",
            "min_confidence_scale",
        )
        _check_positive(self, "assumed_stop_loss", "max_concurrent_positions")
        if self.assumed_stop_loss > 1.0:
            raise ValueError("assumed_stop_loss must be within 0..1")
        if not self.reentry_cooldown_s >= 0.0:
            raise ValueError("reentry_cooldown_s must be 0 or more")
        if len(self.priority_scale) != 5 or not all(0 <= s <= 1 for s in self.priority_scale):
            raise ValueError("priority_scale needs five shares within 0..1, IDLE to URGENT")


#: the most a live transaction's priority fee may be, SOL: the smallest order's SOL
#: (argued in the module docstring)
MAX_PRIORITY_FEE_SOL = RiskLimits().min_order_sol


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSettings:
    """When the circuit breakers trip and recover; defaults argued in the module docstring."""

    max_curve_error: float = 1e-6
    max_feed_lag_s: float = 2.0
    max_silence_s: float = 30.0
    max_events_per_s: float = 1000.0
    rate_window_s: float = 10.0
    max_consecutive_failures: int = 3
    recovery_s: float = 60.0
    stale_recovery_s: float = 10.0
    max_token_silence_s: float = 30.0
    silent_tokens_share: float = 0.8
    min_active_tokens: int = 10

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "max_curve_error",
            "max_feed_lag_s",
            "max_silence_s",
            "max_events_per_s",
            "rate_window_s",
            "max_consecutive_failures",
            "recovery_s",
            "stale_recovery_s",
            "max_token_silence_s",
            "min_active_tokens",
        )
        if not 0.0 < self.silent_tokens_share <= 1.0:
            raise ValueError("silent_tokens_share must be within (0, 1]")


@dataclass(frozen=True, slots=True, kw_only=True)
class PaperExecution:
    """How paper orders fill; defaults argued in the module docstring."""

    latency_s: float = 0.5
    slippage_pct: float = 5.0
    api_fee_rate: float = 0.01
    curve_fee_rate: float = FEE_RATE
    pool_fee_rate: float = FEE_RATE

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError("latency_s must be >= 0")
        if self.slippage_pct < 0:
            raise ValueError("slippage_pct must be >= 0")
        _check_fraction(self, "api_fee_rate", "curve_fee_rate", "pool_fee_rate")


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveExecution:
    """How live orders are sent and confirmed; defaults argued in the module docstring."""

    #: the public key of the wallet the API key trades from: its trades confirm orders
    wallet: str
    priority_fee_sol: float = 0.0001
    answer_timeout_s: float = 5.0
    confirm_s: float = 90.0
    fees: PaperExecution = field(default_factory=PaperExecution)

    def __post_init__(self) -> None:
        if not self.wallet:
            raise ValueError("wallet must be the public key of the API key's wallet")
        if not 0 <= self.priority_fee_sol <= MAX_PRIORITY_FEE_SOL:
            raise ValueError(f"priority_fee_sol must be within 0..{MAX_PRIORITY_FEE_SOL:g}")
        _check_positive(self, "answer_timeout_s", "confirm_s")
        if self.answer_timeout_s >= self.confirm_s:
            # an answer after its order was given up names a signature nothing is kept
            # for: the wallet's trade would go unbooked
            raise ValueError("answer_timeout_s must be below confirm_s")
