"""The simulated pump.fun market: launches, agent trades on the real curve, migrations.

:class:`Market` turns a :class:`MarketConfig` into a deterministic stream of
PumpPortal frames (plain dicts, in the live feed's field order) with their event
times. The same seed gives the same frames, byte for byte.

Curve state is kept the way the chain keeps it: token reserves in base units (6
decimals). ``vSolInBondingCurve`` is the constant product over the token reserves,
exactly as the live feed reports it, and ``solAmount`` is the SOL leg that moved the
reserves (fees are paid outside the curve).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pumpflow.common import curve
from pumpflow.simulator.agents import (
    COMPLETE_VIRTUAL_TOKEN_UNITS,
    INITIAL_REAL_TOKEN_UNITS,
    TOKEN_UNIT,
    AgentConfig,
    Token,
    draw_traits,
    log_uniform,
)
from pumpflow.simulator.ids import IdFactory

Frame = dict[str, object]

# event kinds in the schedule
_LAUNCH = 0
_ORGANIC = 1
_TIMED_BUY = 2
_TIMED_SELL = 3
_BOT = 4
_MIGRATE = 5
_BURST = 6


@dataclass(frozen=True, kw_only=True)
class MarketConfig(AgentConfig):
    """A market run: its seed, launch rate, agent parameters and frame variants."""

    seed: int
    launches_per_minute: float = 30.0
    #: trade frames in the old variant (no solAmount, no pool)
    old_trade_frame_share: float = 0.03
    #: create frames in the old variant (no is_mayhem_mode, no pool)
    old_create_frame_share: float = 0.1
    mayhem_share: float = 0.03
    #: frames whose bondingCurveKey is some other account, as seen live (1 in 40)
    wrong_curve_key_share: float = 1.0 / 40.0


class Market:
    """A seeded market. Each call to :meth:`frames` replays the same run from the start."""

    def __init__(self, config: MarketConfig):
        self.config = config

    def frames(self, duration_s: float | None = None) -> Iterator[tuple[float, Frame]]:
        """Yield ``(seconds since start, frame)`` in time order, up to ``duration_s``."""
        return _Run(self.config).run(math.inf if duration_s is None else duration_s)


class _Run:
    """One pass of the market; all state and randomness of a run live here.

    The trade path is written for speed (locals, closures, one dict literal per frame):
    it is what bounds dataset generation.
    """

    def __init__(self, cfg: MarketConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ids = IdFactory(self.rng)
        self.schedule: list[tuple] = []
        self.seq = 0
        self.heat = 1.0
        self.bot_wallets = [self.ids.key() for _ in range(cfg.bot_wallets)]
        self.returning: list[str] = []
        self.signatures = self.ids.signatures()

    def push(self, t: float, kind: int, *args) -> None:
        self.seq += 1
        heapq.heappush(self.schedule, (t, self.seq, kind, *args))

    def organic_wallet(self) -> str:
        """A fresh wallet, one seen before, or a bot's."""
        cfg, rng = self.cfg, self.rng
        u = rng.random()
        if u < cfg.bot_wallet_share:
            return self.bot_wallets[int(rng.random() * len(self.bot_wallets))]
        returning = self.returning
        if u < cfg.bot_wallet_share + cfg.returning_share and returning:
            return returning[int(rng.random() * len(returning))]
        wallet = self.ids.key()
        if len(returning) < cfg.returning_wallets:
            returning.append(wallet)
        else:
            returning[int(rng.random() * len(returning))] = wallet
        return wallet

    def launch(self, t: float) -> tuple[Frame, Token]:
        """Create a token with its creator's buy; schedule the agents that will trade it."""
        cfg, rng, ids = self.cfg, self.rng, self.ids
        creator = ids.key()
        tok = Token(mint=ids.mint(), curve_key=ids.key(), t0=t)
        signature = next(self.signatures)
        name, symbol = ids.name_and_symbol()
        uri = ids.uri()
        draw_traits(tok, cfg, rng)
        round_buy = rng.random() < cfg.creator_round_buy_share
        if round_buy:
            net = float(rng.choice((1, 1, 2)))
        else:
            net = log_uniform(rng, cfg.creator_buy_min_sol, cfg.creator_buy_max_sol)
        units = int(curve.tokens_for_net_sol(tok, net) * TOKEN_UNIT)
        tok.units -= units
        tok.v_tokens = v_tokens = tok.units / TOKEN_UNIT
        tok.v_sol = v_sol = curve.K / v_tokens
        tok.credit(creator, units)
        sol_amount: float | int = (
            int(net) if round_buy else round(v_sol - curve.INITIAL_VIRTUAL_SOL_RESERVES, 9)
        )
        frame: Frame = {
            "signature": signature,
            "mint": tok.mint,
            "traderPublicKey": creator,
            "txType": "create",
            "initialBuy": units / TOKEN_UNIT,
            "solAmount": sol_amount,
            "bondingCurveKey": tok.curve_key,
            "vTokensInBondingCurve": v_tokens,
            "vSolInBondingCurve": v_sol,
            "marketCapSol": v_sol / v_tokens * curve.TOTAL_SUPPLY,
            "name": name,
            "symbol": symbol,
            "uri": uri,
        }
        if rng.random() >= cfg.old_create_frame_share:
            frame["is_mayhem_mode"] = rng.random() < cfg.mayhem_share
            frame["pool"] = "pump"

        expo = rng.expovariate
        if rng.random() < cfg.rug_share:
            self.push(t + expo(1.0 / cfg.rug_delay_mean_s), _TIMED_SELL, tok, creator)
        for _ in range(_poisson(rng, cfg.snipers_mean)):
            wallet = self.bot_wallets[int(rng.random() * len(self.bot_wallets))]
            at = t + 0.4 + expo(1.0 / cfg.sniper_delay_mean_s)
            size = log_uniform(rng, cfg.sniper_buy_min_sol, cfg.sniper_buy_max_sol)
            self.push(at, _TIMED_BUY, tok, wallet, size)
            self.push(at + 1.0 + expo(1.0 / cfg.sniper_hold_mean_s), _TIMED_SELL, tok, wallet)
        if rng.random() < cfg.bot_share:
            wallet = self.bot_wallets[int(rng.random() * len(self.bot_wallets))]
            start = t + 2.0 + expo(0.1)
            self.push(start, _BOT, tok, wallet, start + expo(1.0 / cfg.bot_run_mean_s))
        self.push(t + 0.4 + expo(max(tok.rate, 1e-3) * 2.0), _ORGANIC, tok)
        return frame, tok

    def run(self, until: float) -> Iterator[tuple[float, Frame]]:
        cfg, rng = self.cfg, self.rng
        schedule = self.schedule
        pop = heapq.heappop
        push = self.push
        random_ = rng.random
        gauss = rng.gauss
        expo = rng.expovariate
        uniform = rng.uniform
        exp = math.exp
        next_signature = self.signatures.__next__
        new_key = self.ids.key
        organic_wallet = self.organic_wallet
        tokens_for_net_sol = curve.tokens_for_net_sol
        k_const = curve.K
        supply = curve.TOTAL_SUPPLY
        fee_factor = 1.0 + curve.FEE_RATE
        unit = TOKEN_UNIT
        complete_units = COMPLETE_VIRTUAL_TOKEN_UNITS
        real_units = INITIAL_REAL_TOKEN_UNITS
        old_share = cfg.old_trade_frame_share
        # one uniform picks the variant: old frame, wrong curve key, or the usual frame
        wrong_key_edge = old_share + cfg.wrong_curve_key_share
        migrate_rate = 1.0 / cfg.migrate_delay_mean_s
        momentum_buy, profit_taking = cfg.momentum_buy, cfg.profit_taking
        buy_sigma, sell_all_share = cfg.buy_sigma, cfg.sell_all_share
        momentum_rate, progress_rate = cfg.momentum_rate, cfg.progress_rate
        progress_life, quiet_rate = cfg.progress_life, cfg.quiet_rate_per_s
        bot_interval_rate = 1.0 / cfg.bot_interval_mean_s
        bot_min, bot_max = cfg.bot_buy_min_sol, cfg.bot_buy_max_sol

        def execute(t: float, tok: Token, wallet: str, is_buy: bool, amount: float) -> Frame:
            """Trade against the curve: ``amount`` is gross SOL for a buy, base units to sell."""
            old_sol = tok.v_sol
            if is_buy:
                units = int(tokens_for_net_sol(tok, amount / fee_factor) * unit)
                left = tok.units - complete_units
                if units >= left:
                    units = left
                    tok.done = True
                    push(t + 0.4 + expo(migrate_rate), _MIGRATE, tok)
                elif units <= 0:
                    units = 1
                tok.units -= units
                tok.v_tokens = v_tokens = tok.units / unit
                tok.v_sol = v_sol = k_const / v_tokens
                balance = tok.credit(wallet, units)
                tok.momentum = 0.8 * tok.momentum + 0.2
                sol = round(v_sol - old_sol, 9)
                tx = "buy"
            else:
                units = int(amount)
                tok.units += units
                tok.v_tokens = v_tokens = tok.units / unit
                tok.v_sol = v_sol = k_const / v_tokens
                balance = tok.debit(wallet, units)
                tok.momentum = 0.8 * tok.momentum - 0.2
                sol = round(old_sol - v_sol, 9)
                tx = "sell"
            u = random_()
            if u < old_share:
                return {
                    "signature": next_signature(),
                    "mint": tok.mint,
                    "traderPublicKey": wallet,
                    "txType": tx,
                    "tokenAmount": units / unit,
                    "newTokenBalance": balance / unit if balance else 0,
                    "bondingCurveKey": tok.curve_key,
                    "vTokensInBondingCurve": v_tokens,
                    "vSolInBondingCurve": v_sol,
                    "marketCapSol": v_sol / v_tokens * supply,
                }
            return {
                "signature": next_signature(),
                "mint": tok.mint,
                "traderPublicKey": wallet,
                "txType": tx,
                "tokenAmount": units / unit,
                "solAmount": sol,
                "newTokenBalance": balance / unit if balance else 0,
                "bondingCurveKey": new_key() if u < wrong_key_edge else tok.curve_key,
                "vTokensInBondingCurve": v_tokens,
                "vSolInBondingCurve": v_sol,
                "marketCapSol": v_sol / v_tokens * supply,
                "pool": "pump",
            }

        launch_rate = cfg.launches_per_minute / 60.0
        push(expo(launch_rate), _LAUNCH)
        push(expo(1.0 / cfg.burst_every_mean_s), _BURST, True)
        while schedule:
            item = pop(schedule)
            t = item[0]
            if t > until:
                return
            kind = item[2]
            if kind == _ORGANIC:
                # a momentum buyer or a profit-taking holder; then the next arrival
                tok = item[3]
                if tok.done:
                    continue
                progress = 1.0 - (tok.units - complete_units) / real_units
                holders = tok.holders
                if (
                    random_() < tok.p_buy + momentum_buy * tok.momentum - profit_taking * progress
                    or not holders
                ):
                    size = tok.size * exp(buy_sigma * gauss(0.0, 1.0)) * (1.0 + 2.0 * progress)
                    frame = execute(t, tok, organic_wallet(), True, size)
                else:
                    wallet = holders[int(random_() * len(holders))]
                    held = tok.holdings[wallet]
                    if random_() >= sell_all_share:
                        held = max(1, int(held * uniform(0.2, 0.8)))
                    frame = execute(t, tok, wallet, False, held)
                if not tok.done:
                    m = tok.momentum
                    rate = (
                        tok.rate
                        * self.heat
                        * (1.0 + momentum_rate * (m if m > 0.0 else 0.0))
                        * (1.0 + progress_rate * progress)
                        * exp(-(t - tok.t0) / (tok.tau * (1.0 + progress_life * progress)))
                    )
                    # below the quiet rate the token's organic flow ends
                    if rate >= quiet_rate:
                        push(t + expo(rate), _ORGANIC, tok)
                yield t, frame
            elif kind == _LAUNCH:
                push(t + expo(launch_rate), _LAUNCH)
                yield t, self.launch(t)[0]
            elif kind == _BOT:
                tok, wallet, end = item[3], item[4], item[5]
                if tok.done:
                    continue
                held = tok.holdings.get(wallet)
                if held:
                    frame = execute(t, tok, wallet, False, held)
                else:
                    frame = execute(t, tok, wallet, True, log_uniform(rng, bot_min, bot_max))
                nxt = t + expo(bot_interval_rate)
                if nxt < end and not tok.done:
                    push(nxt, _BOT, tok, wallet, end)
                yield t, frame
            elif kind == _TIMED_SELL:
                tok, wallet = item[3], item[4]
                held = tok.holdings.get(wallet)
                if tok.done or not held:
                    continue
                yield t, execute(t, tok, wallet, False, held)
            elif kind == _TIMED_BUY:
                tok = item[3]
                if tok.done:
                    continue
                yield t, execute(t, tok, item[4], True, item[5])
            elif kind == _MIGRATE:
                yield (
                    t,
                    {
                        "signature": next_signature(),
                        "mint": item[3].mint,
                        "txType": "migrate",
                        "pool": "pump-amm",
                    },
                )
            elif kind == _BURST:
                # platform-wide frenzy: every token trades several times faster for a while
                if item[3]:
                    self.heat = uniform(cfg.burst_multiplier_min, cfg.burst_multiplier_max)
                    push(t + expo(1.0 / cfg.burst_length_mean_s), _BURST, False)
                else:
                    self.heat = 1.0
                    push(t + expo(1.0 / cfg.burst_every_mean_s), _BURST, True)


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method; the means here are small."""
    limit = math.exp(-mean)
    n, p = 0, rng.random()
    while p > limit:
        n += 1
        p *= rng.random()
    return n
