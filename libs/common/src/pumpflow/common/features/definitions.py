"""Feature definitions, their implementations (one per kind), ordering and versioning.

A feature is declared once as a :class:`FeatureDef` (name, kind, dependencies,
parameters). Its kind is its single implementation: :meth:`FeatureKind.bind` returns
the incremental reader (from a :class:`TokenState`) and the batch writer (from a
:class:`BatchState` into the feature's output row) side by side, so the two paths live
in one place and a test holds them equal. The feature-set version hashes a canonical
encoding of every definition plus :data:`IMPLEMENTATION_REVISION` (bump it when a
kind's maths change).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pumpflow.common.curve import LAMPORTS_PER_SOL, TOTAL_SUPPLY, CurveState, curve_progress
from pumpflow.common.features.batch import BatchState
from pumpflow.common.features.state import (
    BUY,
    LEFT,
    NEW,
    REF,
    SELL,
    Layout,
    TokenState,
    rsi_value,
    slot,
)

#: bump when the maths of any kind changes, so the version changes with it
IMPLEMENTATION_REVISION = 1

ParamValue = int | float | str | bool | None
#: an expression over ``s`` and ``$0``.. (see EXPRESSION_GLOBALS), or a callable
IncrementalFn = str | Callable[[TokenState, tuple[float, ...]], float]
BatchFn = Callable[[BatchState, tuple[np.ndarray, ...], np.ndarray], object]


class FeatureDefinitionError(ValueError):
    """A feature set that cannot be built: unknown kind or dependency, cycle, bad params."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FeatureDef:
    """One declared feature."""

    name: str
    kind: str
    dependencies: tuple[str, ...] = ()
    #: sorted (name, value) pairs; build with :func:`feature`
    parameters: tuple[tuple[str, ParamValue], ...] = ()

    @property
    def params(self) -> dict[str, ParamValue]:
        return dict(self.parameters)

    def canonical(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "dependencies": list(self.dependencies),
            "parameters": [[k, v] for k, v in self.parameters],
        }


def feature(name: str, kind: str, *dependencies: str, **parameters: ParamValue) -> FeatureDef:
    """Declare a feature: ``feature("return_60", "return", "price", window=60.0)``."""
    return FeatureDef(
        name=name,
        kind=kind,
        dependencies=tuple(dependencies),
        parameters=tuple(sorted(parameters.items())),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Requirements:
    windows: tuple[float, ...] = ()
    max_windows: tuple[float, ...] = ()
    ewma_alphas: tuple[float, ...] = ()
    rsi_periods: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class FeatureKind:
    """The one implementation of a kind of feature."""

    name: str
    #: dependencies this kind reads, in order (checked against the declaration)
    dependency_count: int = 0
    required_params: tuple[str, ...] = ()
    requires: Callable[[dict], Requirements] = field(default=lambda p: Requirements())
    bind: Callable[[dict, Layout], tuple[IncrementalFn, BatchFn]] = field(default=None)


KINDS: dict[str, FeatureKind] = {}


def register_kind(kind: FeatureKind) -> FeatureKind:
    if kind.name in KINDS:
        raise FeatureDefinitionError(f"feature kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def _window(p: dict) -> Requirements:
    return Requirements(windows=(float(p["window"]),))


# --------------------------------------------------------------------------------------
# The kinds. Each bind returns (incremental reader, batch writer) over the same maths.
#
# The incremental reader is an expression over ``s`` (the TokenState) and ``$0``, ``$1``
# (the dependencies' values), using the names in EXPRESSION_GLOBALS; the manager
# compiles a feature set's expressions into one function, so a vector costs a few
# attribute reads per feature. (A callable ``(state, deps) -> float`` works too, at a
# call per feature.) The batch writer fills ``out`` (one float64 row per trade) from a
# BatchState in place, with the same float operations in the same order.

#: names the incremental expressions may use
EXPRESSION_GLOBALS: dict[str, Any] = {
    "CurveState": CurveState,
    "LAMPORTS_PER_SOL": LAMPORTS_PER_SOL,
    "TOTAL_SUPPLY": TOTAL_SUPPLY,
    "curve_progress": curve_progress,
    "rsi_value": rsi_value,
    "sqrt": math.sqrt,
}


def _bind_price(p, layout):
    return "s.price", (lambda b, d, out: np.copyto(out, b.price))


def _bind_market_cap(p, layout):
    def bat(b, d, out):
        np.copyto(out, CurveState(v_sol=b.v_sol, v_tokens=b.v_tokens).market_cap_sol)

    return "CurveState(v_sol=s.v_sol, v_tokens=s.v_tokens).market_cap_sol", bat


def _bind_progress(p, layout):
    return (
        "float(curve_progress(s.v_tokens))",
        lambda b, d, out: np.copyto(out, curve_progress(b.v_tokens)),
    )


def _bind_return(p, layout):
    k = layout.window_index(float(p["window"]))

    def bat(b, d, out):
        b.window_ref_price(k, out)
        np.divide(d[0], out, out=out)
        out -= 1.0

    return f"$0 / s.wstate[{slot(k, REF)}] - 1.0", bat


def _bind_volume(side):
    def bind(p, layout):
        k = layout.window_index(float(p["window"]))

        def bat(b, d, out):
            b.window_sum(b.buy_cum if side == "buy" else b.sell_cum, k, out)
            out /= LAMPORTS_PER_SOL

        at = slot(k, BUY if side == "buy" else SELL)
        return f"s.wstate[{at}] / LAMPORTS_PER_SOL", bat

    return bind


def _bind_buy_share(p, layout):
    def bat(b, d, out):
        np.add(d[0], d[1], out=out)
        traded = out > 0.0
        np.divide(d[0], out, out=out, where=traded)
        out[~traded] = 0.5

    return "($0 / ($0 + $1) if $0 + $1 > 0.0 else 0.5)", bat


def _bind_trades_per_minute(p, layout):
    window = float(p["window"])
    k = layout.window_index(window)
    scale = 60.0 / window

    def bat(b, d, out):
        b.window_trades(k, out)
        out *= scale

    return f"(s.n_events - s.wstate[{slot(k, LEFT)}]) * {scale!r}", bat


def _bind_unique_traders(p, layout):
    return "float(s.unique_traders)", (lambda b, d, out: np.copyto(out, b.new_cum[1:]))


def _bind_new_traders(p, layout):
    k = layout.window_index(float(p["window"]))
    return (
        f"float(s.wstate[{slot(k, NEW)}])",
        lambda b, d, out: b.window_sum(b.new_cum, k, out),
    )


def _bind_largest_buy(p, layout):
    window = p.get("window")
    if window is None:

        def bat(b, d, out):
            np.divide(b.largest_buy, LAMPORTS_PER_SOL, out=out)

        return "s.largest_buy / LAMPORTS_PER_SOL", bat
    window = float(window)
    k = layout.max_index(window)
    kw = layout.window_index(window)

    def bat_window(b, d, out):
        np.divide(b.window_max_buy(kw), LAMPORTS_PER_SOL, out=out)

    return f"s.window_max_buy({k}) / LAMPORTS_PER_SOL", bat_window


def _largest_buy_requires(p):
    window = p.get("window")
    if window is None:
        return Requirements()
    return Requirements(windows=(float(window),), max_windows=(float(window),))


def _bind_top_buyer_share(p, layout):
    def bat(b, d, out):
        total = b.buy_cum[1:]
        bought = total > 0
        np.divide(b.max_trader_buy, total, out=out, where=bought)
        out[~bought] = 0.0

    return "(s.max_trader_buy / s.total_buy if s.total_buy else 0.0)", bat


def _bind_creator_holding(p, layout):
    def bat(b, d, out):
        b.creator_balance(out)
        out /= TOTAL_SUPPLY

    return "s.creator_balance / TOTAL_SUPPLY", bat


def _bind_creator_sold(p, layout):
    return "(1.0 if s.creator_sold else 0.0)", (lambda b, d, out: b.creator_sold(out))


def _bind_since_launch(p, layout):
    return "s.last_time - s.first_time", (
        lambda b, d, out: np.subtract(b.time, b.first_time, out=out)
    )


def _bind_since_last_trade(p, layout):
    def bat(b, d, out):
        if b.n:
            out[0] = 0.0
            np.subtract(b.time[1:], b.time[:-1], out=out[1:])

    return "s.last_time - s.prev_time", bat


def _bind_volatility(p, layout):
    k = layout.ewma_alphas.index(float(p["alpha"]))

    def bat(b, d, out):
        b.ewma_variance(k, out)
        np.sqrt(out, out=out)

    return f"sqrt(s.ewma[{k}])", bat


def _bind_rsi(p, layout):
    k = layout.rsi_periods.index(int(p["period"]))

    def bat(b, d, out):
        gain, loss = b.rsi_averages(k)
        moved = loss != 0.0
        # 100 - 100 / (1 + gain / loss) where losses exist
        np.divide(gain, loss, out=out, where=moved)
        np.add(out, 1.0, out=out, where=moved)
        np.divide(100.0, out, out=out, where=moved)
        np.subtract(100.0, out, out=out, where=moved)
        still = ~moved
        out[still] = np.where(gain[still] > 0.0, 100.0, 50.0)

    return f"rsi_value(s.rsi[{2 * k}], s.rsi[{2 * k + 1}])", bat


def _bind_drawdown(p, layout):
    def bat(b, d, out):
        np.divide(d[0], b.peak_price, out=out)
        np.subtract(1.0, out, out=out)

    return "1.0 - $0 / s.peak_price", bat


for _kind in (
    FeatureKind(name="price", bind=_bind_price),
    FeatureKind(name="market_cap_sol", bind=_bind_market_cap),
    FeatureKind(name="curve_progress", bind=_bind_progress),
    FeatureKind(
        name="return",
        dependency_count=1,
        required_params=("window",),
        requires=_window,
        bind=_bind_return,
    ),
    FeatureKind(
        name="buy_volume_sol",
        required_params=("window",),
        requires=_window,
        bind=_bind_volume("buy"),
    ),
    FeatureKind(
        name="sell_volume_sol",
        required_params=("window",),
        requires=_window,
        bind=_bind_volume("sell"),
    ),
    FeatureKind(name="buy_share", dependency_count=2, bind=_bind_buy_share),
    FeatureKind(
        name="trades_per_minute",
        required_params=("window",),
        requires=_window,
        bind=_bind_trades_per_minute,
    ),
    FeatureKind(name="unique_traders", bind=_bind_unique_traders),
    FeatureKind(
        name="new_traders",
        required_params=("window",),
        requires=_window,
        bind=_bind_new_traders,
    ),
    FeatureKind(name="largest_buy_sol", requires=_largest_buy_requires, bind=_bind_largest_buy),
    FeatureKind(name="top_buyer_share", bind=_bind_top_buyer_share),
    FeatureKind(name="creator_holding_share", bind=_bind_creator_holding),
    FeatureKind(name="creator_sold", bind=_bind_creator_sold),
    FeatureKind(name="time_since_launch", bind=_bind_since_launch),
    FeatureKind(name="time_since_last_trade", bind=_bind_since_last_trade),
    FeatureKind(
        name="ewma_volatility",
        required_params=("alpha",),
        requires=lambda p: Requirements(ewma_alphas=(float(p["alpha"]),)),
        bind=_bind_volatility,
    ),
    FeatureKind(
        name="rsi",
        required_params=("period",),
        requires=lambda p: Requirements(rsi_periods=(int(p["period"]),)),
        bind=_bind_rsi,
    ),
    FeatureKind(name="drawdown_from_peak", dependency_count=1, bind=_bind_drawdown),
):
    register_kind(_kind)


# --------------------------------------------------------------------------------------
# The default feature set.

WINDOWS = (10.0, 30.0, 60.0, 300.0)


def _window_label(window: float) -> str:
    return str(int(window)) if float(window).is_integer() else str(window).replace(".", "_")


def default_feature_set(windows: Sequence[float] = WINDOWS) -> tuple[FeatureDef, ...]:
    """The standard features (every service, model and backtest uses these)."""
    defs = [
        feature("price", "price"),
        feature("market_cap_sol", "market_cap_sol"),
        feature("curve_progress", "curve_progress"),
    ]
    for w in windows:
        label = _window_label(w)
        defs += [
            feature(f"return_{label}s", "return", "price", window=float(w)),
            feature(f"buy_volume_sol_{label}s", "buy_volume_sol", window=float(w)),
            feature(f"sell_volume_sol_{label}s", "sell_volume_sol", window=float(w)),
        ]
    defs += [
        feature("buy_share_60s", "buy_share", "buy_volume_sol_60s", "sell_volume_sol_60s"),
        feature("trades_per_minute", "trades_per_minute", window=60.0),
        feature("unique_traders", "unique_traders"),
        feature("new_traders_60s", "new_traders", window=60.0),
        feature("largest_buy_sol", "largest_buy_sol"),
        feature("largest_buy_sol_60s", "largest_buy_sol", window=60.0),
        feature("top_buyer_share", "top_buyer_share"),
        feature("creator_holding_share", "creator_holding_share"),
        feature("creator_sold", "creator_sold"),
        feature("time_since_launch", "time_since_launch"),
        feature("time_since_last_trade", "time_since_last_trade"),
        feature("ewma_volatility", "ewma_volatility", alpha=0.1),
        feature("rsi_14", "rsi", period=14),
        feature("drawdown_from_peak", "drawdown_from_peak", "price"),
    ]
    return tuple(defs)


# --------------------------------------------------------------------------------------
# Resolution: order, layout, version.


def resolve_order(definitions: Iterable[FeatureDef]) -> tuple[FeatureDef, ...]:
    """Definitions in dependency order (stable: declaration order among independents)."""
    defs = list(definitions)
    by_name: dict[str, FeatureDef] = {}
    for d in defs:
        if not isinstance(d, FeatureDef):
            raise FeatureDefinitionError(f"not a FeatureDef: {d!r}")
        if d.name in by_name:
            raise FeatureDefinitionError(f"feature {d.name!r} is declared twice")
        by_name[d.name] = d
    for d in defs:
        for dep in d.dependencies:
            if dep not in by_name:
                raise FeatureDefinitionError(f"feature {d.name!r} depends on unknown {dep!r}")
    ordered: list[FeatureDef] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(d: FeatureDef, path: list[str]) -> None:
        mark = state.get(d.name)
        if mark == 2:
            return
        if mark == 1:
            cycle = [*path[path.index(d.name) :], d.name]
            raise FeatureDefinitionError(f"dependency cycle: {' -> '.join(cycle)}")
        state[d.name] = 1
        for dep in d.dependencies:
            visit(by_name[dep], [*path, d.name])
        state[d.name] = 2
        ordered.append(d)

    for d in defs:
        visit(d, [])
    return tuple(ordered)


def check_definition(d: FeatureDef) -> FeatureKind:
    kind = KINDS.get(d.kind)
    if kind is None:
        raise FeatureDefinitionError(f"feature {d.name!r} has unknown kind {d.kind!r}")
    if len(d.dependencies) != kind.dependency_count:
        raise FeatureDefinitionError(
            f"feature {d.name!r} ({d.kind}) needs {kind.dependency_count} dependencies, "
            f"got {len(d.dependencies)}"
        )
    missing = [p for p in kind.required_params if p not in d.params]
    if missing:
        raise FeatureDefinitionError(f"feature {d.name!r} ({d.kind}) lacks parameters {missing}")
    return kind


def layout_for(definitions: Iterable[FeatureDef]) -> Layout:
    """The primitives a feature set needs."""
    windows: set[float] = set()
    max_windows: set[float] = set()
    alphas: set[float] = set()
    periods: set[int] = set()
    for d in definitions:
        req = check_definition(d).requires(d.params)
        windows |= set(req.windows)
        max_windows |= set(req.max_windows)
        alphas |= set(req.ewma_alphas)
        periods |= set(req.rsi_periods)
    try:
        return Layout(
            windows=tuple(sorted(windows)),
            max_windows=tuple(sorted(max_windows)),
            ewma_alphas=tuple(sorted(alphas)),
            rsi_periods=tuple(sorted(periods)),
        )
    except ValueError as exc:
        raise FeatureDefinitionError(str(exc)) from None


def feature_set_version(definitions: Iterable[FeatureDef]) -> str:
    """Stable hash of the definitions (order-independent) and the implementation revision."""
    body = {
        "revision": IMPLEMENTATION_REVISION,
        "features": sorted((d.canonical() for d in definitions), key=lambda c: c["name"]),
    }
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
