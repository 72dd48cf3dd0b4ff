"""Calibration: measure a run's market statistics against the market's (docs/market.md).

Everything is measured from the frames, as a feed would see them. Token statistics
cover the tokens launched inside the window; the run continues 16 minutes past the
window so each of them is followed for at least 15 minutes.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from pumpflow.simulator.market import Frame, Market, MarketConfig

QUIET_AFTER_S = 15 * 60
TAIL_S = 16 * 60
#: reference average trades/s (23 to 58 live) at the reference launch rate of 30 a minute
REFERENCE_LAUNCHES_PER_MINUTE = 30.0


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


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value * 100:.2f}%"
    return f"{value:.2f}"


def measure(frames: Iterable[tuple[float, Frame]], *, window_s: float,
            launches_per_minute: float) -> CalibrationReport:
    """Compute the calibration statistics of a run's frames."""
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
    n = len(launched)
    quiet = sum(
        1 for mint, t0 in launched.items() if last_trade.get(mint, t0) - t0 <= QUIET_AFTER_S
    )
    grad_minutes = [d / 60.0 for d, _ in migrated.values()]
    grad_trades = [float(c) for _, c in migrated.values()]
    avg_tps = window_trades / window_s
    peak_tps = float(max(per_second.values(), default=0))
    scale = launches_per_minute / REFERENCE_LAUNCHES_PER_MINUTE
    stats = (
        Statistic(name="graduation rate", value=len(migrated) / n if n else 0.0,
                  target="~1%", low=0.006, high=0.021, unit="%"),
        Statistic(name="tokens quiet within 15 min of launch", value=quiet / n if n else 0.0,
                  target="~95%", low=0.92, high=0.98, unit="%"),
        Statistic(name="graduates: median trades",
                  value=statistics.median(grad_trades) if grad_trades else 0.0,
                  target="~457", low=300.0, high=650.0),
        Statistic(name="graduates: median minutes to graduate",
                  value=statistics.median(grad_minutes) if grad_minutes else 0.0,
                  target="4-5 (4.4)", low=3.5, high=5.5),
        Statistic(name="average trades/s", value=avg_tps, target="23-58",
                  low=25.0 * scale, high=60.0 * scale),
        Statistic(name="peak trades/s (1 s window) / average",
                  value=peak_tps / avg_tps if avg_tps else 0.0,
                  target="several x", low=2.5, high=12.0),
        Statistic(name="launches per minute", value=n / (window_s / 60.0),
                  target=f"{launches_per_minute:g}",
                  low=launches_per_minute * 0.9, high=launches_per_minute * 1.1),
    )
    return CalibrationReport(
        statistics=stats, tokens=n, graduates=len(migrated), trades=window_trades
    )


def calibrate(config: MarketConfig, *, minutes: float) -> CalibrationReport:
    """Run ``config`` for ``minutes`` (plus the follow-up tail) and measure it."""
    window_s = minutes * 60.0
    frames = Market(config).frames(window_s + TAIL_S)
    return measure(frames, window_s=window_s, launches_per_minute=config.launches_per_minute)
