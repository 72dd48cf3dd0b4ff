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
    INITIAL_VIRTUAL_TOKEN_UNITS,
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
    """One pass of the market; all state and randomness of a run live here."""

    def __init__(self, cfg: MarketConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ids = IdFactory(self.rng)
        self.schedule: list[tuple] = []
        self.seq = 0
        self.heat = 1.0
        self.bot_wallets = [self.ids.key() for _ in range(cfg.bot_wallets)]
        self.returning: list[str] = []

    def push(self, t: float, kind: int, *args) -> None:
        self.seq += 1
        heapq.heappush(self.schedule, (t, self.seq, kind, *args))

    # ------------------------------------------------------------------ wallets

    def organic_wallet(self) -> str:
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

    # ------------------------------------------------------------------ frames

    def trade_frame(self, tok: Token, wallet: str, is_buy: bool, units: int, sol: float,
                    balance: int) -> Frame:
        rng = self.rng
        cfg = self.cfg
        v_tokens = tok.v_tokens
        v_sol = tok.v_sol
        key = tok.curve_key
        if rng.random() < cfg.wrong_curve_key_share:
            key = self.ids.key()
        new_balance = balance / TOKEN_UNIT if balance else 0
        if rng.random() < cfg.old_trade_frame_share:
            return {
                "signature": self.ids.signature(),
                "mint": tok.mint,
                "traderPublicKey": wallet,
                "txType": "buy" if is_buy else "sell",
                "tokenAmount": units / TOKEN_UNIT,
                "newTokenBalance": new_balance,
                "bondingCurveKey": key,
                "vTokensInBondingCurve": v_tokens,
                "vSolInBondingCurve": v_sol,
                "marketCapSol": v_sol / v_tokens * curve.TOTAL_SUPPLY,
            }
        return {
            "signature": self.ids.signature(),
            "mint": tok.mint,
            "traderPublicKey": wallet,
            "txType": "buy" if is_buy else "sell",
            "tokenAmount": units / TOKEN_UNIT,
            "solAmount": sol,
            "newTokenBalance": new_balance,
            "bondingCurveKey": key,
            "vTokensInBondingCurve": v_tokens,
            "vSolInBondingCurve": v_sol,
            "marketCapSol": v_sol / v_tokens * curve.TOTAL_SUPPLY,
            "pool": "pump",
        }

    # ------------------------------------------------------------------ curve

    def buy(self, t: float, tok: Token, wallet: str, gross_sol: float) -> Frame:
        """Execute a buy of ``gross_sol`` SOL (fee included) and return its frame."""
        net = gross_sol / (1.0 + curve.FEE_RATE)
        units = int(curve.tokens_for_net_sol(tok, net) * TOKEN_UNIT)
        real = tok.units - COMPLETE_VIRTUAL_TOKEN_UNITS
        if units >= real:
            units = real
        if units <= 0:
            units = 1
        old_sol = tok.v_sol
        tok.units -= units
        tok.v_tokens = v_tokens = tok.units / TOKEN_UNIT
        tok.v_sol = curve.K / v_tokens
        balance = tok.credit(wallet, units)
        tok.momentum = 0.8 * tok.momentum + 0.2
        frame = self.trade_frame(tok, wallet, True, units, round(tok.v_sol - old_sol, 9), balance)
        if units == real:
            tok.done = True
            delay = self.rng.expovariate(1.0 / self.cfg.migrate_delay_mean_s)
            self.push(t + 0.4 + delay, _MIGRATE, tok)
        return frame

    def sell(self, tok: Token, wallet: str, units: int) -> Frame:
        """Execute a sale of ``units`` base units held by ``wallet`` and return its frame."""
        old_sol = tok.v_sol
        tok.units += units
        tok.v_tokens = v_tokens = tok.units / TOKEN_UNIT
        tok.v_sol = curve.K / v_tokens
        balance = tok.debit(wallet, units)
        tok.momentum = 0.8 * tok.momentum - 0.2
        return self.trade_frame(tok, wallet, False, units, round(old_sol - tok.v_sol, 9), balance)

    # ------------------------------------------------------------------ agents

    def launch(self, t: float) -> Frame:
        cfg, rng, ids = self.cfg, self.rng, self.ids
        creator = ids.key()
        tok = Token(mint=ids.mint(), curve_key=ids.key(), creator=creator, t0=t)
        signature = ids.signature()
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
        sol_amount: float | int = int(net) if round_buy else round(v_sol - curve.INITIAL_VIRTUAL_SOL_RESERVES, 9)
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

        # the agents that will act on this token
        expo = rng.expovariate
        if rng.random() < cfg.rug_share:
            self.push(t + expo(1.0 / cfg.rug_delay_mean_s), _TIMED_SELL, tok, creator)
        n_snipers = _poisson(rng, cfg.snipers_mean)
        for _ in range(n_snipers):
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
        return frame

    def organic(self, t: float, tok: Token) -> Frame | None:
        """One organic arrival: a momentum buyer or a profit-taking holder; reschedule."""
        cfg, rng = self.cfg, self.rng
        progress = 1.0 - (tok.units - COMPLETE_VIRTUAL_TOKEN_UNITS) / INITIAL_REAL_TOKEN_UNITS
        m = tok.momentum
        p_buy = tok.p_buy + cfg.momentum_buy * m - cfg.profit_taking * progress
        if rng.random() < p_buy or not tok.holders:
            size = tok.size * math.exp(cfg.buy_sigma * rng.gauss(0.0, 1.0))
            frame = self.buy(t, tok, self.organic_wallet(), size * (1.0 + 2.0 * progress))
        else:
            holders = tok.holders
            wallet = holders[int(rng.random() * len(holders))]
            frame = self.sell_share(tok, wallet)
        if tok.done:
            return frame
        age = t - tok.t0
        m = tok.momentum
        rate = (
            tok.rate
            * self.heat
            * (1.0 + cfg.momentum_rate * (m if m > 0.0 else 0.0))
            * (1.0 + cfg.progress_rate * progress)
            * math.exp(-age / (tok.tau * (1.0 + cfg.progress_life * progress)))
        )
        if rate < cfg.quiet_rate_per_s:
            tok.alive = False
        else:
            self.push(t + rng.expovariate(rate), _ORGANIC, tok)
        return frame

    def sell_share(self, tok: Token, wallet: str) -> Frame:
        held = tok.holdings[wallet]
        if self.rng.random() < self.cfg.sell_all_share:
            return self.sell(tok, wallet, held)
        return self.sell(tok, wallet, max(1, int(held * self.rng.uniform(0.2, 0.8))))

    # ------------------------------------------------------------------ loop

    def run(self, until: float) -> Iterator[tuple[float, Frame]]:
        cfg, rng = self.cfg, self.rng
        schedule = self.schedule
        pop = heapq.heappop
        launch_rate = cfg.launches_per_minute / 60.0
        self.push(rng.expovariate(launch_rate), _LAUNCH)
        self.push(rng.expovariate(1.0 / cfg.burst_every_mean_s), _BURST, True)
        while schedule:
            item = pop(schedule)
            t = item[0]
            if t > until:
                return
            kind = item[2]
            if kind == _ORGANIC:
                tok = item[3]
                if tok.done:
                    continue
                yield t, self.organic(t, tok)
            elif kind == _LAUNCH:
                self.push(t + rng.expovariate(launch_rate), _LAUNCH)
                yield t, self.launch(t)
            elif kind == _BOT:
                tok, wallet, end = item[3], item[4], item[5]
                if tok.done:
                    continue
                if wallet in tok.holdings:
                    frame = self.sell(tok, wallet, tok.holdings[wallet])
                else:
                    size = log_uniform(rng, cfg.bot_buy_min_sol, cfg.bot_buy_max_sol)
                    frame = self.buy(t, tok, wallet, size)
                nxt = t + rng.expovariate(1.0 / cfg.bot_interval_mean_s)
                if nxt < end and not tok.done:
                    self.push(nxt, _BOT, tok, wallet, end)
                yield t, frame
            elif kind == _TIMED_SELL:
                tok, wallet = item[3], item[4]
                if tok.done or wallet not in tok.holdings:
                    continue
                yield t, self.sell(tok, wallet, tok.holdings[wallet])
            elif kind == _TIMED_BUY:
                tok = item[3]
                if tok.done:
                    continue
                yield t, self.buy(t, tok, item[4], item[5])
            elif kind == _MIGRATE:
                tok = item[3]
                yield t, {
                    "signature": self.ids.signature(),
                    "mint": tok.mint,
                    "txType": "migrate",
                    "pool": "pump-amm",
                }
            elif kind == _BURST:
                if item[3]:
                    self.heat = rng.uniform(cfg.burst_multiplier_min, cfg.burst_multiplier_max)
                    self.push(t + rng.expovariate(1.0 / cfg.burst_length_mean_s), _BURST, False)
                else:
                    self.heat = 1.0
                    self.push(t + rng.expovariate(1.0 / cfg.burst_every_mean_s), _BURST, True)


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method; the means here are small."""
    limit = math.exp(-mean)
    n, p = 0, rng.random()
    while p > limit:
        n += 1
        p *= rng.random()
    return n
