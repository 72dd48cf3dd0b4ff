"""Calibration: measure runs' market statistics against the market's (docs/market.md).

Everything is measured from the frames, as a feed would see them. Token statistics
cover the tokens launched inside the window; the run continues 16 minutes past the
window so each of them is followed for at least 15 minutes.

One seed's half hour launches about 900 tokens, of which about 10 graduate, and
graduates' minutes spread from under one to over fifteen: ten of them place their
median only within a few minutes. A median of graduates is therefore accepted when
its 95% interval (order statistics, free of any assumed distribution) reaches the
reference range, so its tolerance narrows as graduates accumulate. Runs of several
seeds are pooled (:func:`calibrate_seeds`) to narrow it: counts add up, the
graduates of every run make one sample, and the windows are laid end to end as one
long run.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pumpflow.simulator.market import Frame, Market, MarketConfig

QUIET_AFTER_S = 15 * 60
TAIL_S = 16 * 60
#: reference average trades/s (23 to 58 live) at the reference launch rate of 30 a minute
REFERENCE_LAUNCHES_PER_MINUTE = 30.0
#: graduates' median minutes to graduate: 4.4 (docs/market.md, section 2), within 10%
GRADUATE_MINUTES = (3.96, 4.84)
#: graduates' median trades: about 457 (docs/market.md, section 2), within 20%
GRADUATE_TRADES = (365.0, 550.0)
#: two-sided 95% normal quantile, for the median's order-statistic interval
_Z95 = 1.96


@dataclass(frozen=True, kw_only=True)
class Statistic:
    """One measured figure beside its target and accepted range."""

    name: str
    value: float
    target: str
    low: float
    high: float
    unit: str = ""

    @property
    def ok(self) -> bool:
        return self.low <= self.value <= self.high


@dataclass(frozen=True, kw_only=True)
class CalibrationReport:
    statistics: tuple[Statistic, ...]
    tokens: int
    graduates: int
    trades: int

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.statistics)

    def by_name(self, name: str) -> Statistic:
        return next(s for s in self.statistics if s.name == name)

    def format(self) -> str:
        """A plain-text table: statistic, value, target, tolerance, verdict."""
        lines = [
            f"{'statistic':<38}{'value':>12}  {'target':<14}{'tolerance':<20}ok",
            "-" * 88,
        ]
        for s in self.statistics:
            tol = f"[{_fmt(s.low, s.unit)}, {_fmt(s.high, s.unit)}]"
            verdict = "yes" if s.ok else "NO"
            lines.append(
                f"{s.name:<38}{_fmt(s.value, s.unit):>12}  {s.target:<14}{tol:<20}{verdict}"
            )
        lines.append(
            f"({self.tokens} tokens launched in the window, {self.graduates} graduated, "
            f"{self.trades} trades in the window)"
        )
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class RunTally:
    """What one run's frames add to a calibration: counts and graduates' samples."""

    window_s: float
    tokens: int
    quiet: int
    window_trades: int
    peak_trades_per_s: int
    graduate_minutes: tuple[float, ...]
    graduate_trades: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class SeedsCalibration:
    """Each seed's report and the pooled one, with the tallies behind them."""

    seeds: tuple[int, ...]
    tallies: tuple[RunTally, ...]
    per_seed: tuple[CalibrationReport, ...]
    pooled: CalibrationReport


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value * 100:.2f}%"
    return f"{value:.2f}"


def _median_statistic(
    name: str, values: Sequence[float], *, target: str, reference: tuple[float, float]
) -> Statistic:
    """The median of ``values``, accepted if its 95% interval meets ``reference``.

    The interval runs between the order statistics n/2 -+ 1.96 sqrt(n)/2. It meets
    the reference range exactly when the median lies in that range widened below by
    the interval's upper half and above by its lower half. Widened below no further
    than zero: the medians judged are of trades and minutes, which no sample has below.
    """
    xs = sorted(values)
    n = len(xs)
    if not n:
        return Statistic(name=name, value=0.0, target=target, low=reference[0], high=reference[1])
    half = _Z95 * math.sqrt(n) / 2.0
    below = xs[max(math.floor(n / 2.0 - half), 1) - 1]
    above = xs[min(math.ceil(n / 2.0 + half), n) - 1]
    median = statistics.median(xs)
    return Statistic(
        name=name,
        value=median,
        target=target,
        low=max(reference[0] - (above - median), 0.0),
        high=reference[1] + (median - below),
    )


def tally(frames: Iterable[tuple[float, Frame]], *, window_s: float) -> RunTally:
    """Count a run's frames: tokens launched in the window, their fate, the trade rate."""
    launched: dict[str, float] = {}
    trades: dict[str, int] = {}
    last_trade: dict[str, float] = {}
    migrated: dict[str, tuple[float, int]] = {}
    per_second: dict[int, int] = {}
    window_trades = 0
    for t, frame in frames:
        tx = frame["txType"]
        mint = frame["mint"]
        if tx == "create":
            if t < window_s:
                launched[mint] = t
                trades[mint] = 0
        elif tx == "migrate":
            if mint in launched:
                migrated[mint] = (t - launched[mint], trades[mint])
        else:
            if t < window_s:
                window_trades += 1
                second = int(t)
                per_second[second] = per_second.get(second, 0) + 1
            if mint in launched:
                trades[mint] += 1
                last_trade[mint] = t
    quiet = sum(
        1 for mint, t0 in launched.items() if last_trade.get(mint, t0) - t0 <= QUIET_AFTER_S
    )
    return RunTally(
        window_s=window_s,
        tokens=len(launched),
        quiet=quiet,
        window_trades=window_trades,
        peak_trades_per_s=max(per_second.values(), default=0),
        graduate_minutes=tuple(d / 60.0 for d, _ in migrated.values()),
        graduate_trades=tuple(c for _, c in migrated.values()),
    )


def report(tallies: Sequence[RunTally], *, launches_per_minute: float) -> CalibrationReport:
    """The statistics of one run, or of several pooled as one long run."""
    n = sum(r.tokens for r in tallies)
    quiet = sum(r.quiet for r in tallies)
    window_s = sum(r.window_s for r in tallies)
    window_trades = sum(r.window_trades for r in tallies)
    grad_minutes = [m for r in tallies for m in r.graduate_minutes]
    grad_trades = [float(c) for r in tallies for c in r.graduate_trades]
    graduates = len(grad_minutes)
    avg_tps = window_trades / window_s
    peak_tps = float(max((r.peak_trades_per_s for r in tallies), default=0))
    scale = launches_per_minute / REFERENCE_LAUNCHES_PER_MINUTE
    stats = (
        Statistic(
            name="graduation rate",
            value=graduates / n if n else 0.0,
            target="~1%",
            low=0.006,
            high=0.021,
            unit="%",
        ),
        Statistic(
            name="tokens quiet within 15 min of launch",
            value=quiet / n if n else 0.0,
            target="~95%",
            low=0.92,
            high=0.98,
            unit="%",
        ),
        _median_statistic(
            "graduates: median trades", grad_trades, target="~457", reference=GRADUATE_TRADES
        ),
        _median_statistic(
            "graduates: median minutes to graduate",
            grad_minutes,
            target="4.4",
            reference=GRADUATE_MINUTES,
        ),
        Statistic(
            name="average trades/s",
            value=avg_tps,
            target="23-58",
            low=25.0 * scale,
            high=60.0 * scale,
        ),
        Statistic(
            name="peak trades/s (1 s window) / average",
            value=peak_tps / avg_tps if avg_tps else 0.0,
            target="several x",
            low=2.5,
            high=12.0,
        ),
        Statistic(
            name="launches per minute",
            value=n / (window_s / 60.0),
            target=f"{launches_per_minute:g}",
            low=launches_per_minute * 0.9,
            high=launches_per_minute * 1.1,
        ),
    )
    return CalibrationReport(statistics=stats, tokens=n, graduates=graduates, trades=window_trades)


def run_tally(config: MarketConfig, *, minutes: float) -> RunTally:
    """Run ``config`` for ``minutes`` (plus the follow-up tail) and count it."""
    window_s = minutes * 60.0
    return tally(Market(config).frames(window_s + TAIL_S), window_s=window_s)


def calibrate(config: MarketConfig, *, minutes: float) -> CalibrationReport:
    """Run ``config`` for ``minutes`` (plus the follow-up tail) and measure it."""
    return report(
        [run_tally(config, minutes=minutes)], launches_per_minute=config.launches_per_minute
    )


def calibrate_seeds(
    config: MarketConfig, seeds: Iterable[int], *, minutes: float
) -> SeedsCalibration:
    """Run ``config`` under each seed; measure each run and their pool."""
    seeds = tuple(seeds)
    rate = config.launches_per_minute
    tallies = tuple(
        run_tally(dataclasses.replace(config, seed=seed), minutes=minutes) for seed in seeds
    )
    return SeedsCalibration(
        seeds=seeds,
        tallies=tallies,
        per_seed=tuple(report([t], launches_per_minute=rate) for t in tallies),
        pooled=report(tallies, launches_per_minute=rate),
    )
