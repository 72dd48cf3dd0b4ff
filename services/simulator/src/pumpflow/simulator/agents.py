"""Who trades a token: creator, snipers, organic momentum traders, bots, profit-takers.

Each launched token gets a :class:`Token` holding its curve (in base units, as the
chain does), every trader's balance, and the traits its agents act on. The decisions
are small functions of the market's random generator so a seed fixes everything.

Behaviour, in words:

- creator: buys 0.05 to 2 SOL in the create transaction; a share of creators rug,
  selling the whole bag after a while.
- snipers: a few bots buy 0.1 to 1.5 SOL within the first seconds and sell
  everything soon after (or hold a little longer when the price runs).
- organic traders: arrive at a rate set by the token's appeal, decaying with age,
  raised by momentum (recent buys) and curve progress; buyers lean in when the
  price is rising, sellers are random holders taking profit or cutting losses.
- bots: volume/bump bots cycling tiny buys and sells (well under 0.01 SOL to a few
  hundredths) for a minute or two, from a small pool of wallets seen on many tokens.
- platform bursts: now and then the whole market trades several times faster for
  tens of seconds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pumpflow.common import curve

#: the chain keeps token reserves in base units (6 decimals); so does the simulator
TOKEN_UNIT = 10**curve.TOKEN_DECIMALS
INITIAL_VIRTUAL_TOKEN_UNITS = int(curve.INITIAL_VIRTUAL_TOKEN_RESERVES) * TOKEN_UNIT
COMPLETE_VIRTUAL_TOKEN_UNITS = int(curve.COMPLETE_VIRTUAL_TOKEN_RESERVES) * TOKEN_UNIT
INITIAL_REAL_TOKEN_UNITS = int(curve.INITIAL_REAL_TOKEN_RESERVES) * TOKEN_UNIT


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Agent parameters; the defaults are calibrated to the market of docs/market.md."""

    # creator
    creator_buy_min_sol: float = 0.05
    creator_buy_max_sol: float = 2.0
    #: creators who buy exactly 1 or 2 SOL (the feed then shows an integer solAmount)
    creator_round_buy_share: float = 0.06
    #: creators who dump their whole bag (rug-pull)
    rug_share: float = 0.35
    rug_delay_mean_s: float = 40.0
    # snipers
    snipers_mean: float = 2.5
    sniper_delay_mean_s: float = 1.0
    sniper_buy_min_sol: float = 0.1
    sniper_buy_max_sol: float = 1.5
    sniper_hold_mean_s: float = 20.0
    # organic traders
    #: spread of token appeal (log-normal sigma); the tail of it graduates
    appeal_sigma: float = 1.0
    organic_rate_per_s: float = 0.25
    #: how a token's arrival rate and its life grow with appeal. Their sum (1) sets how
    #: its trade count grows, and with it the graduation rate; their split sets the
    #: pace of the graduates, the appeal tail. The market's graduates take a median
    #: 4.4 minutes (docs/market.md, section 2); pooled over about 1,000 graduates of
    #: unseen seeds, 0.5/0.5 gave 3.55 and 0.4/0.6 gives 4.28, with median trades
    #: 443 and 444 against about 457 (docs/benchmarks.md, Simulator calibration).
    rate_appeal_exponent: float = 0.4
    max_organic_rate_per_s: float = 3.0
    size_appeal_exponent: float = 0.5
    #: e-folding time of the organic arrival rate at appeal 1
    organic_life_s: float = 40.0
    life_appeal_exponent: float = 0.6
    buy_bias: float = 0.38
    appeal_buy_slope: float = 0.11
    momentum_buy: float = 0.15
    #: holders sell more as the curve fills (they are in profit)
    profit_taking: float = 0.3
    momentum_rate: float = 1.5
    progress_rate: float = 2.0
    progress_life: float = 4.0
    buy_median_sol: float = 0.15
    buy_sigma: float = 1.1
    #: share of sells that close the whole bag (the rest sell 20-80%)
    sell_all_share: float = 0.55
    #: a token's organic flow stops once its arrival rate falls below this
    quiet_rate_per_s: float = 1.0 / 50.0
    # bots
    bot_share: float = 0.35
    bot_interval_mean_s: float = 3.0
    bot_run_mean_s: float = 60.0
    bot_buy_min_sol: float = 0.002
    bot_buy_max_sol: float = 0.03
    bot_wallets: int = 300
    # wallets
    returning_wallets: int = 20_000
    #: share of organic trades by a wallet seen before (the rest are fresh wallets)
    returning_share: float = 0.35
    #: share of organic trades by the bot wallets
    bot_wallet_share: float = 0.2
    # platform bursts
    burst_every_mean_s: float = 240.0
    burst_length_mean_s: float = 20.0
    burst_multiplier_min: float = 2.0
    burst_multiplier_max: float = 5.0
    # migration
    migrate_delay_mean_s: float = 1.5


class Token:
    """One token's curve, holders and agent traits.

    ``v_sol`` and ``v_tokens`` mirror :class:`pumpflow.common.curve.CurveState`, so the
    curve functions take a Token wherever they take a state.
    """

    __slots__ = (
        "curve_key",
        "done",
        "holders",
        "holdings",
        "hpos",
        "mint",
        "momentum",
        "p_buy",
        "rate",
        "size",
        "t0",
        "tau",
        "units",
        "v_sol",
        "v_tokens",
    )

    def __init__(self, *, mint: str, curve_key: str, t0: float):
        self.mint = mint
        self.curve_key = curve_key
        self.t0 = t0
        self.units = INITIAL_VIRTUAL_TOKEN_UNITS
        self.v_tokens = curve.INITIAL_VIRTUAL_TOKEN_RESERVES
        self.v_sol = curve.INITIAL_VIRTUAL_SOL_RESERVES
        self.holdings: dict[str, int] = {}
        self.holders: list[str] = []
        self.hpos: dict[str, int] = {}
        self.momentum = 0.0
        self.done = False
        self.rate = 0.0
        self.size = 0.1
        self.p_buy = 0.5
        self.tau = 60.0

    def credit(self, wallet: str, units: int) -> int:
        """Add ``units`` to ``wallet``'s balance; return the new balance."""
        holdings = self.holdings
        balance = holdings.get(wallet, 0)
        if not balance:
            self.hpos[wallet] = len(self.holders)
            self.holders.append(wallet)
        balance += units
        holdings[wallet] = balance
        return balance

    def debit(self, wallet: str, units: int) -> int:
        """Take ``units`` (at most the balance) from ``wallet``; return the new balance."""
        holdings = self.holdings
        balance = holdings[wallet] - units
        if balance <= 0:
            del holdings[wallet]
            # swap-remove keeps holder selection O(1)
            i = self.hpos.pop(wallet)
            last = self.holders.pop()
            if last != wallet:
                self.holders[i] = last
                self.hpos[last] = i
            return 0
        holdings[wallet] = balance
        return balance


def draw_traits(token: Token, cfg: AgentConfig, rng: random.Random) -> None:
    """Give a fresh token its appeal and the organic flow that follows from it."""
    appeal = math.exp(rng.gauss(0.0, cfg.appeal_sigma))
    token.rate = min(
        cfg.max_organic_rate_per_s, cfg.organic_rate_per_s * appeal**cfg.rate_appeal_exponent
    )
    token.size = cfg.buy_median_sol * appeal**cfg.size_appeal_exponent
    token.tau = cfg.organic_life_s * appeal**cfg.life_appeal_exponent
    token.p_buy = cfg.buy_bias + cfg.appeal_buy_slope * math.log(appeal)


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    """A size spread evenly over orders of magnitude between ``low`` and ``high``."""
    return math.exp(rng.uniform(math.log(low), math.log(high)))
