"""Charts as inline SVG: lines, bars, horizontal bars, histogram, calibration.

Each function returns one ``<svg>`` element as text, sized by its ``viewBox`` so it
scales with the page; no script, no font or style from outside the document. Axis
ticks fall on round numbers (:func:`nice_ticks`). An empty series draws the frame and
says so, so a chart never silently vanishes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from pumpflow.common.text import counted

WIDTH, HEIGHT = 560, 300
#: plot area margins: left (y tick labels), right, top, bottom (x tick labels, title)
MARGIN = (64, 16, 12, 44)
GAIN, LOSS, INK, GRID, ACCENT = "#2e7d32", "#c62828", "#333", "#e3e3e3", "#1565c0"
#: the colours of overlaid lines, in turn
SERIES = (ACCENT, "#ef6c00", "#6a1b9a", "#00897b", "#ad1457", "#7cb342", "#5d4037", "#f9a825")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high], about ``count`` of them."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tick range must be finite, got {low}..{high}")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick step needs."""
    decimals = 0
    # a step of 2.5 x 10^k takes a decimal more than its magnitude (0.25 is no 0.2)
    while decimals < 6 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    text = f"{value:.{decimals}f}"
    return "0" if text.strip("-0.") == "" else text


@dataclass(frozen=True, slots=True)
class _Frame:
    """The plot area and the maps from data to pixels."""

    x_ticks: list[float]
    y_ticks: list[float]
    #: room left of the plot area for the tick or bar labels
    left: float = MARGIN[0]

    @property
    def right(self) -> float:
        return WIDTH - MARGIN[1]

    @property
    def top(self) -> float:
        return MARGIN[2]

    @property
    def bottom(self) -> float:
        return HEIGHT - MARGIN[3]

    def x(self, value: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (value - lo) / (hi - lo) * (self.right - self.left)

    def y(self, value: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.bottom - (value - lo) / (hi - lo) * (self.bottom - self.top)

    def axes(
        self, x_label: str, y_label: str, *, x_ticks: bool = True, y_ticks: bool = True
    ) -> list[str]:
        parts = []
        y_step = self.y_ticks[1] - self.y_ticks[0]
        for value in self.y_ticks if y_ticks else ():
            y = self.y(value)
            parts.append(_line(self.left, y, self.right, y, GRID))
            parts.append(_text(self.left - 6, y + 4, tick_label(value, y_step), anchor="end"))
        if x_ticks:
            x_step = self.x_ticks[1] - self.x_ticks[0]
            for value in self.x_ticks:
                x = self.x(value)
                parts.append(_line(x, self.bottom, x, self.bottom + 4, INK))
                parts.append(_text(x, self.bottom + 16, tick_label(value, x_step)))
        parts.append(_line(self.left, self.bottom, self.right, self.bottom, INK))
        parts.append(_line(self.left, self.top, self.left, self.bottom, INK))
        parts.append(_text((self.left + self.right) / 2, HEIGHT - 6, x_label))
        middle = (self.top + self.bottom) / 2
        parts.append(
            f'<text x="14" y="{middle:.1f}" transform="rotate(-90 14 {middle:.1f})" '
            f'text-anchor="middle" font-size="12" fill="{INK}">{escape(y_label)}</text>'
        )
        return parts


def _line(x1: float, y1: float, x2: float, y2: float, color: str, width: float = 1) -> str:
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
        f'stroke="{color}" stroke-width="{width}"/>'
    )


def _text(x: float, y: float, text: str, *, anchor: str = "middle", size: int = 11) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
        f'fill="{INK}">{escape(text)}</text>'
    )


def _svg(parts: Sequence[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(label)}" font-family="sans-serif">'
        + "".join(parts)
        + "</svg>"
    )


def _empty(label: str, message: str) -> str:
    frame = _Frame([0.0, 1.0], [0.0, 1.0])
    parts = frame.axes("", "", x_ticks=False, y_ticks=False)
    parts.append(_text(WIDTH / 2, HEIGHT / 2, message, size=14))
    return _svg(parts, label)


def line_chart(
    points: Sequence[tuple[float, float]],
    *,
    label: str,
    x_label: str,
    y_label: str,
    step: bool = False,
    empty: str = "no data",
) -> str:
    """A line through ``points`` (x ascending); ``step`` holds each value until the next x."""
    return lines_chart(
        [("", points)], label=label, x_label=x_label, y_label=y_label, step=step, empty=empty
    )


def lines_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    label: str,
    x_label: str,
    y_label: str,
    step: bool = False,
    empty: str = "no data",
) -> str:
    """A line per (name, points) over shared axes, each in its colour of :data:`SERIES`,
    named in a legend when it has a name; ``step`` as :func:`line_chart`'s."""
    drawn = [(name, points) for name, points in series if points]
    if not drawn:
        return _empty(label, empty)
    xs = [x for _, points in drawn for x, _ in points]
    ys = [y for _, points in drawn for _, y in points]
    frame = _Frame(nice_ticks(min(xs), max(xs)), nice_ticks(min(*ys, 0.0), max(*ys, 0.0)))
    parts = frame.axes(x_label, y_label)
    parts.append(_line(frame.left, frame.y(0), frame.right, frame.y(0), "#999"))
    for n, (_, points) in enumerate(series):
        coords: list[str] = []
        for i, (x, y) in enumerate(points):
            if step and i:
                coords.append(f"{frame.x(x):.1f},{frame.y(points[i - 1][1]):.1f}")
            coords.append(f"{frame.x(x):.1f},{frame.y(y):.1f}")
        if coords:
            parts.append(
                f'<polyline points="{" ".join(coords)}" fill="none" stroke="{_color(n)}" '
                'stroke-width="2" stroke-linejoin="round"/>'
            )
    return _svg(parts + _legend(frame, [name for name, _ in series]), label)


def _color(n: int) -> str:
    """The colour of the ``n``-th overlaid series."""
    return SERIES[n % len(SERIES)]


def _legend(frame: _Frame, names: Sequence[str]) -> list[str]:
    """The names of the overlaid series, each beside its colour, in a box over the plot
    (a series without a name is not in it; nothing without a name)."""
    named = [name for name in names if name]
    if not named:
        return []
    legend = [
        f'<rect x="{frame.left + 4:.1f}" y="{frame.top + 2:.1f}" '
        f'width="{36 + 6.5 * max(map(len, named)):.1f}" height="{6 + 15 * len(named):.1f}" '
        'fill="#fff" fill-opacity="0.85" stroke="#ccc"/>'
    ]
    for n, name in enumerate(names):
        if name:
            y = frame.top + 17 + 15 * (len(legend) // 2)  # after the box, two parts a name
            legend.append(_line(frame.left + 10, y - 4, frame.left + 28, y - 4, _color(n), 3))
            legend.append(_text(frame.left + 34, y, name, anchor="start"))
    return legend


def bar_chart(
    values: Sequence[float],
    *,
    label: str,
    x_label: str,
    y_label: str,
    colors: Sequence[str] | None = None,
    x_range: tuple[float, float] | None = None,
    empty: str = "no data",
) -> str:
    """Vertical bars, one per value, side by side over ``x_range`` (default: 1..n)."""
    if not values:
        return _empty(label, empty)
    lo, hi = x_range if x_range is not None else (0.5, len(values) + 0.5)
    frame = _Frame(nice_ticks(lo, hi), nice_ticks(min(*values, 0.0), max(*values, 0.0)))
    parts = frame.axes(x_label, y_label)
    width = (hi - lo) / len(values)
    zero = frame.y(0)
    for i, value in enumerate(values):
        x0, x1 = frame.x(lo + i * width), frame.x(lo + (i + 1) * width)
        gap = min(2.0, (x1 - x0) * 0.15)
        top, bottom = sorted((frame.y(value), zero))
        color = colors[i] if colors is not None else ACCENT
        parts.append(
            f'<rect x="{x0 + gap:.1f}" y="{top:.1f}" width="{max(x1 - x0 - 2 * gap, 0.5):.1f}" '
            f'height="{max(bottom - top, 0.5):.1f}" fill="{color}"/>'
        )
    return _svg(parts, label)


def histogram(
    values: Sequence[float], *, label: str, x_label: str, bins: int = 20, empty: str = "no data"
) -> str:
    """How many ``values`` fall in each of ``bins`` equal bins over their range."""
    if not values:
        return _empty(label, empty)
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = [0] * bins
    for value in values:
        counts[min(int((value - lo) / (hi - lo) * bins), bins - 1)] += 1
    return bar_chart(counts, label=label, x_label=x_label, y_label="count", x_range=(lo, hi))


def hbar_chart(
    items: Sequence[tuple[str, float]], *, label: str, x_label: str, empty: str = "no data"
) -> str:
    """One horizontal bar per (name, value), top to bottom, the value at its end."""
    if not items:
        return _empty(label, empty)
    values = [v for _, v in items]
    frame = _Frame(
        nice_ticks(min(*values, 0.0), max(*values, 0.0)),
        [0.0, float(len(items))],
        left=12 + 6.5 * max(len(name) for name, _ in items),
    )
    parts = frame.axes(x_label, "", y_ticks=False)
    band = (frame.bottom - frame.top) / len(items)
    for i, (name, value) in enumerate(items):
        y = frame.top + i * band + band * 0.15
        x0, x1 = sorted((frame.x(0), frame.x(value)))
        parts.append(
            f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 0.5):.1f}" '
            f'height="{band * 0.7:.1f}" fill="{ACCENT}"/>'
        )
        parts.append(_text(frame.left - 6, y + band * 0.35 + 4, name, anchor="end"))
        parts.append(_text(x1 + 4, y + band * 0.35 + 4, f"{value:g}", anchor="start"))
    return _svg(parts, label)


def calibration_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float, int]]]],
    *,
    label: str,
    empty: str = "no data",
) -> str:
    """(mean predicted, observed rate, count) per bin of each (name, bins) against the
    diagonal of perfect calibration, each in its colour of :data:`SERIES`, named in a
    legend when it has a name; a point's area grows with its count."""
    if not any(bins for _, bins in series):
        return _empty(label, empty)
    frame = _Frame(nice_ticks(0.0, 1.0), nice_ticks(0.0, 1.0))
    parts = frame.axes("predicted probability", "observed rate")
    parts.append(_line(frame.x(0), frame.y(0), frame.x(1), frame.y(1), "#999"))
    largest = max(count for _, bins in series for _, _, count in bins)
    for n, (_, bins) in enumerate(series):
        if not bins:
            continue
        coords = " ".join(f"{frame.x(p):.1f},{frame.y(o):.1f}" for p, o, _ in bins)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{_color(n)}" stroke-width="1.5"/>'
        )
        for predicted, observed, count in bins:
            radius = 3 + 6 * math.sqrt(count / largest)
            parts.append(
                f'<circle cx="{frame.x(predicted):.1f}" cy="{frame.y(observed):.1f}" '
                f'r="{radius:.1f}" fill="{_color(n)}" fill-opacity="0.7">'
                f"<title>{predicted:.2f} predicted, {observed:.2f} observed, "
                f"{counted(count, 'label')}</title>"
                "</circle>"
            )
    return _svg(parts + _legend(frame, [name for name, _ in series]), label)
