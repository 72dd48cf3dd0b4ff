"""``pumpflow backtest``: replay a stream through the whole embedded system, as fast as it goes.

The stream is raw PumpPortal frames with their arrival times, replayed in time order,
from one of:

- ``--dataset FILE.jsonl``: a dataset file the simulator wrote (``pumpflow sim dataset``)
  or a recording (``pumpflow record --out``), told apart by their lines;
- ``--seed N`` (``--minutes``, ``--launches``): a market simulated here;
- ``--dsn``/``--schema`` (or the settings'): frames recorded in Postgres, in time order
  (``--start``/``--end`` limit the window).

Each frame goes to the feed's per-frame path (what its socket reader calls: decode,
validation, auto-subscription, dedup, per-mint seq), then features, activity, model,
trading (paper) and exit, one process, the queued in-memory bus and the in-process
store, as ``pumpflow run`` wires them but on one partition (no replica shares them). The
clock is a ReplayClock at each frame's arrival time; every market second the bus is
drained, then the clock fires the due timers (trading's fills and breakers, the exit
rules, activity's quiet timers) and the bus is drained again: every event is handled
before the clock passes the next market second, so every decision sees the market as it
would live, and the same stream gives the same report.

Every configuration starts from one base: ``pumpflow run``'s trading settings
(``trading_min_score=0.5``, ``trading_reject_creator_sold=false``) over the services'
defaults, where the PUMPFLOW_* environment and the config file win as they do there.
Without ``--config``, ``--configs`` or ``--grid``, one run of the base (``run``).

Strategy comparison: ``--config NAME=KEY=VALUE,KEY=VALUE`` (repeatable) names a
configuration by the settings it changes over the base, any setting of trading, exit or
model (``trading_min_score=0.6``, ``exit_max_hold_s=1200``, ...), and wins over it;
``--config NAME`` alone is the base, the plain backtest's results. Every configuration
runs on the same frames in a system of its own, and one table compares them, again in
an HTML page beside their reports (``...-comparison.html``) with their equity curves on
one plot. ``--configs FILE.toml`` reads configurations from a file, one table each
(``[patient]`` then ``exit_max_hold_s = 1200``). ``--json FILE`` also writes the base,
each configuration's settings and results (the same for the same stream) and its
timings.

Parameter sweeps: ``--grid KEY=V1,V2,...`` (repeatable) runs every point of the grids'
cross product, the first grid's values varying slowest, each named by its values
(``trading_min_score=0.55,exit_max_hold_s=600``) and typed as ``--config`` values are.
With ``--config`` or ``--configs`` the product is run over each of them in turn (named
``patient,trading_min_score=0.55``; one that sets a swept key is refused), otherwise
over the base. At most 256 configurations.

Configurations run ``--jobs`` at once, each in a worker process handed the frames
read here once (default: the CPUs this process may use; ``--jobs 1``: one after the
other, in this process); each gives the report it gives alone, and the reports are
printed in the order given. One that fails is named with why (and its traceback, on
stderr); the others' reports are still printed and written, and the command exits 1.

Progress: a bar with the rate and an ETA on a terminal's stderr (one per configuration
running at once), a plain line every ``--every`` seconds otherwise (logs, CI), nothing
with ``--quiet``, which leaves out the services' warnings too (said once per
configuration, of the same stream): the reports and the failures alone are said.

The report, per configuration: orders (requested, filled, rejected), entries, exits
by rule, sales by rule (a ladder's partial sales included) with their realised PnL,
realised PnL and the open positions marked at what selling them whole would
bring (:func:`~pumpflow.common.trading.exit_value`), after every fee (those no trade
has marked since their entry are unmarked: their worth is unknown, so they are counted
and left out); win rate of the closed positions; the largest fall of the realised PnL
from its peak, sale by sale (an open position's partial sales included); predictions
the model published, in all and by model and arm with the model version that made them,
and each model and arm's live AUC and precision (at its threshold) on the labels
resolved by the stream's end, entries and PnL (the positions its live predictions
opened); entries skipped by reason and circuit breakers
tripped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import pickle
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgspec

from pumpflow.cli.report import (
    COMPARISON,
    backtest_report_path,
    report_writable,
    write_backtest_comparison,
    write_backtest_reports,
)
from pumpflow.cli.run import PAPER, RUN_MIN_SCORE, RUN_SETTINGS, paper_note
from pumpflow.common.runtime.arguments import (
    UsageError,
    check_window,
    count,
    epoch_time,
    help_text,
    positive,
    postgres_dsn,
    postgres_source,
    schema_name,
    writable,
)
from pumpflow.common.text import counted
from pumpflow.report import results as report_results
from pumpflow.report.results import figure_text, unmarked_note

#: 2023-11-14T22:13:20Z: where a simulated stream starts
SIM_START = 1_700_000_000.0
#: one process on one core shares no partitions with replicas: one partition hands a
#: service each market second's events as one delivery (16 split them into 3 deliveries
#: a frame, a third of the run's CPU), and trading takes the tokens' predictions in the
#: order they were made, not partition by partition
PARTITIONS = 1
#: market seconds between drains and timer firings
TICK_S = 1.0
#: ``pumpflow run``'s trading: the shipped model rarely scores above the service's 0.6
RUN_CONFIG: dict[str, Any] = {"trading_min_score": RUN_MIN_SCORE, **RUN_SETTINGS}
#: the services a configuration may set
CONFIGURABLE = ("trading", "exit", "model")
#: settings every service has that the backtest sets itself
RUN_OWN = ("service", "transport", "partitions")
DRAIN_S = 600.0

Frames = Sequence[tuple[float, bytes]]
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------ streams


def simulated_frames(
    seed: int, minutes: float, *, launches_per_minute: float | None = None,
    start: float = SIM_START,
) -> list[tuple[float, bytes]]:  # fmt: skip
    """(arrival epoch seconds, frame bytes) of ``minutes`` of the seeded market."""
    from pumpflow.simulator.market import Market, MarketConfig

    config = MarketConfig(seed=seed)
    if launches_per_minute is not None:
        config = MarketConfig(seed=seed, launches_per_minute=launches_per_minute)
    encode = msgspec.json.Encoder().encode
    return [(start + t, encode(frame)) for t, frame in Market(config).frames(minutes * 60)]


def dataset_frames(path: str) -> list[tuple[float, bytes]]:
    """The frames of a dataset file, as written, or of a recording's published events,
    in time order (as Postgres replays them)."""
    from pumpflow.simulator.dataset import read_dataset_raw

    # the replay clock never goes back: a frame out of order would run at a later
    # frame's time; the sort is stable, so frames of one arrival time keep their order
    return sorted(read_dataset_raw(path), key=lambda timed: timed[0])


async def database_frames(
    dsn: str, schema: str, start: float | None, end: float | None
) -> list[tuple[float, bytes]]:
    """The recorded frames of the window that were published, in time order."""
    from pumpflow.common.db.pool import create_pool
    from pumpflow.common.storage import REPLAY_FETCH_TIMEOUT_S, TokenEventStore

    pool = await create_pool(dsn, schema, max_size=2, existing=True)
    try:
        return [
            (stored.event.time, stored.frame)
            async for stored in TokenEventStore(pool).stream_stored(
                start=start, end=end, fetch_timeout=REPLAY_FETCH_TIMEOUT_S
            )
            # stored without a seq: never published live, so not replayed either
            if stored.event.seq is not None and stored.frame
        ]
    finally:
        await pool.close()


# ------------------------------------------------------------------ configurations


def configurable_settings() -> dict[str, Any]:
    """The settings classes of the services a configuration may change, by service."""
    from pumpflow.exit.service import ExitService
    from pumpflow.model.service import ModelService
    from pumpflow.trading.service import TradingService

    return {cls.name: cls.settings_class for cls in (TradingService, ExitService, ModelService)}


def service_overrides(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Route each setting of ``config`` to the configurable services that have it."""
    classes = configurable_settings()
    routed: dict[str, dict[str, Any]] = {name: {} for name in classes}
    for key, value in config.items():
        if key in PAPER:
            raise ValueError(f"{key!r}: a backtest trades on paper, its stream is past")
        if key in RUN_OWN:
            raise ValueError(
                f"{key!r} is the backtest's own: one process, the in-memory bus, "
                f"{counted(PARTITIONS, 'partition')}"
            )
        owners = [name for name, settings in classes.items() if key in settings.model_fields]
        if not owners:
            raise ValueError(f"no setting {key!r} in {', '.join(CONFIGURABLE)}")
        for name in owners:
            routed[name][key] = value
    return routed


def run_config() -> dict[str, Any]:
    """The base of every configuration: ``pumpflow run``'s trading settings, those the
    environment or the config file sets at their values there, which win here as they do
    there."""
    loaded = configurable_settings()["trading"].load(service="trading", transport="memory")
    given = loaded.model_fields_set
    return {
        key: getattr(loaded, key) if key in given else value for key, value in RUN_CONFIG.items()
    }


def check_config(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse a configuration whose setting no service has or whose value its setting
    does not take, before any frame is read and any configuration runs; each of its
    settings as it runs (typed, as its service reads it: ``"0.55"`` of a flag is 0.55)."""
    from pumpflow.common.runtime.settings import SettingsError

    classes = configurable_settings()
    ran: dict[str, Any] = {}
    try:
        for service, settings in service_overrides(config).items():
            loaded = classes[service].load(service=service, transport="memory", **settings)
            ran.update((key, getattr(loaded, key)) for key in settings)
    except (SettingsError, ValueError) as exc:
        raise ValueError(f"configuration {name!r}: {exc}") from None
    return ran


def check_models(name: str | None, config: Mapping[str, Any], at: float) -> None:
    """Refuse a configuration (``name``; None: the plain run's) whose models the model
    service would refuse at its start, at ``at`` on the replay clock: before the
    configurations ahead of it run, their results lost to it."""
    from prometheus_client import CollectorRegistry

    from pumpflow.common.clock import ReplayClock
    from pumpflow.model.service import ModelService, SettingsServingError

    settings = ModelService.settings_class.load(
        service="model", transport="memory", **service_overrides(config)["model"]
    )
    try:
        ModelService(settings, registry=CollectorRegistry()).check_settings_serving(ReplayClock(at))
    except SettingsServingError as exc:
        if name is None:
            raise
        raise SettingsServingError(f"configuration {name!r}: {exc}") from None


def _items(text: str) -> list[str]:
    """``text`` split at its commas outside JSON's brackets, braces and strings (a list
    or mapping setting's value is JSON)."""
    items, start, depth, quoted, escaped = [], 0, 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            escaped, quoted = char == "\\", char != '"'
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    """``NAME=KEY=VALUE,KEY=VALUE`` (or ``NAME`` alone: the base) -> (name, settings)."""
    name, _, rest = text.partition("=")
    if not name:
        raise ValueError(f"configuration {text!r}: a name first, NAME=KEY=VALUE,...")
    settings: dict[str, str] = {}
    for item in filter(None, _items(rest)):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"configuration {name!r}: {item!r} is not KEY=VALUE")
        if (key := key.strip()) in settings:
            raise ValueError(f"configuration {name!r}: {key} given twice")
        settings[key] = value.strip()
    return name, settings


#: the most configurations a grid may make: more is a typo's (or hours of runs)
GRID_CAP = 256


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` -> (key, its values as given: typed where they are checked)."""
    key, sep, rest = text.partition("=")
    if not sep or not (key := key.strip()):
        raise ValueError(f"--grid {text!r}: KEY=V1,V2,...")
    values = [value.strip() for value in _items(rest)]
    if not rest.strip():
        raise ValueError(f"--grid {key}: no values")
    if twice := [value or "''" for value, n in Counter(values).items() if n > 1]:
        raise ValueError(f"--grid {key}: {', '.join(twice)} given twice")
    return key, values


def grid_configs(
    grids: Sequence[tuple[str, Sequence[str]]], over: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[tuple[str, dict[str, Any]]]:
    """Every point of the grids' cross product (the first grid's values varying slowest),
    over each configuration of ``over`` in turn, or over the base when there is none;
    named by its values (``trading_min_score=0.55,exit_max_hold_s=600``), after the
    configuration's name over one (``patient,trading_min_score=0.55``)."""
    keys = [key for key, _ in grids]
    if twice := [key for key, n in Counter(keys).items() if n > 1]:
        raise ValueError(f"--grid {', '.join(twice)}: given twice")
    for name, config in over:
        if swept := [key for key in keys if key in config]:
            raise ValueError(f"configuration {name!r} sets {', '.join(swept)}, which --grid sweeps")
    made = math.prod(len(values) for _, values in grids) * max(len(over), 1)
    if made > GRID_CAP:
        raise ValueError(
            f"--grid: {made:,} configurations, more than {GRID_CAP}: sweep fewer values"
        )
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(
        *(values for _, values in grids)
    )]  # fmt: skip

    def named(point: Mapping[str, str]) -> str:
        return ",".join(f"{key}={value}" for key, value in point.items())

    if not over:
        return [(named(point), point) for point in points]
    return [
        (f"{name},{named(point)}", {**config, **point}) for name, config in over for point in points
    ]


def read_configs(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The configurations of a TOML file: each table is one, named by its header."""
    from pumpflow.common.runtime.settings import read_toml_tables

    configs = list(read_toml_tables(path, path, hint=" of settings").items())
    if not configs:
        raise ValueError(
            f"{path}: no configuration: a table each ([patient] then exit_max_hold_s = 1200)"
        )
    return configs


# ------------------------------------------------------------------ the run


@dataclass
class Report:
    """What one configuration did on the stream."""

    name: str
    frames: int
    seconds: float
    cpu_s: float
    #: ``model.prediction`` events the model published (every arm)
    predictions: int
    #: (requested|filled|rejected, buy|sell) -> orders
    orders: Counter
    entries: int
    bought_sol: float
    realized_sol: float
    unrealized_sol: float
    open_positions: int
    closed_positions: int
    wins: int
    fees_sol: float
    #: largest fall of the realised PnL from its running peak, sale by sale
    max_drawdown_sol: float
    exits: Counter = field(default_factory=Counter)
    #: "model/arm" -> (live AUC, labels)
    auc: dict[str, tuple[float, int]] = field(default_factory=dict)
    #: "model/arm" -> (live precision at the model's threshold, the threshold)
    precision: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: "model/arm" -> (labels scored at or above the threshold, labels)
    selected: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: "model/arm" -> model version -> predictions it published
    predicted: dict[str, dict[str, int]] = field(default_factory=dict)
    breakers: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    #: what the HTML report shows (:mod:`pumpflow.report`)
    report_data: Any = None
    #: open positions no trade has marked since their entry, left out of unrealized_sol
    unmarked: int = 0

    @property
    def pnl(self) -> float:
        return self.realized_sol + self.unrealized_sol

    @property
    def requested(self) -> int:
        return self.orders["requested", "buy"] + self.orders["requested", "sell"]

    def in_flight(self, side: str) -> int:
        """Orders of ``side`` with no outcome (filled or rejected) by the stream's end."""
        o = self.orders
        return o["requested", side] - o["filled", side] - o["rejected", side]

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.closed_positions if self.closed_positions else None

    def results(self) -> dict[str, Any]:
        """What the configuration did, without the timings, for machines: equal for
        equal inputs."""
        o, sol = self.orders, _sol
        return {
            "frames": self.frames,
            "predictions": self.predictions,
            "orders": {
                side: {kind: o[kind, side] for kind in ("requested", "filled", "rejected")}
                | {"in_flight": self.in_flight(side)}
                for side in ("buy", "sell")
            },
            "entries": self.entries,
            "bought_sol": sol(self.bought_sol),
            "closed_positions": self.closed_positions,
            "open_positions": self.open_positions,
            "unmarked_positions": self.unmarked,
            "wins": self.wins,
            "win_rate": self.win_rate,
            "exits": dict(sorted(self.exits.items())),
            "sales_by_rule": {
                rule: {"sales": n, "realized_sol": sol(realized)}
                for rule, (n, realized) in self.sales_by_rule().items()
            },
            "realized_sol": sol(self.realized_sol),
            "unrealized_sol": sol(self.unrealized_sol),
            "pnl_sol": sol(self.pnl),
            "fees_sol": sol(self.fees_sol),
            "max_drawdown_sol": sol(self.max_drawdown_sol),
            "models": self.models(),
            "pnl_by_arm": {
                arm: {
                    "entries": a.entries,
                    "realized_sol": sol(a.realized_sol),
                    "unrealized_sol": sol(a.unrealized_sol),
                }
                for arm, a in self.pnl_by_arm().items()
            },
            "breakers_tripped": dict(sorted(self.breakers.items())),
            "entries_skipped": dict(sorted(self.skipped.items())),
        }

    def models(self) -> dict[str, dict[str, Any]]:
        """The predictions (and the versions that made them) and live figures of each
        "model/arm" (NaN, an undefined figure, as None)."""
        models: dict[str, dict[str, Any]] = {}
        for arm, versions in sorted(self.predicted.items()):
            models.setdefault(arm, {}).update(
                predictions=sum(versions.values()), versions=sorted(versions)
            )
        for arm, (auc, labels) in sorted(self.auc.items()):
            models.setdefault(arm, {}).update(auc=_defined(auc), labels=labels)
        for arm, (precision, threshold) in sorted(self.precision.items()):
            models.setdefault(arm, {}).update(precision=_defined(precision), threshold=threshold)
        for arm, (selected, labels) in sorted(self.selected.items()):
            models.setdefault(arm, {}).update(selected=selected, labels=labels)
        return models

    def exits_text(self) -> str:
        """Positions closed by each rule, as ``rule n, ...``."""
        return ", ".join(f"{rule} {n}" for rule, n in sorted(self.exits.items()))

    def sales_by_rule(self) -> dict[str, tuple[int, float]]:
        """:func:`~pumpflow.report.results.sales_by_rule` of the run."""
        data = self.report_data
        return report_results.sales_by_rule(data) if data is not None else {}

    def pnl_by_arm(self) -> dict[str, report_results.ArmPnl]:
        """:func:`~pumpflow.report.results.pnl_by_arm` of the run."""
        data = self.report_data
        return report_results.pnl_by_arm(data.trades) if data is not None else {}

    def sales_text(self) -> str:
        data = self.report_data
        return report_results.sales_text(data) if data is not None else ""

    def predictions_text(self) -> str:
        return report_results.predictions_text(self.predictions, self.predicted)

    def auc_text(self) -> str:
        return report_results.auc_text(self.auc)

    def precision_text(self) -> str:
        return report_results.precision_text(self.precision, self.selected)

    def text(self) -> str:
        from pumpflow.cli.console import no_order_line

        o = self.orders
        lines = [
            f"backtest '{self.name}': {counted(self.frames, 'frame')} in {self.seconds:.1f} s "
            f"({self.frames / max(self.seconds, 1e-9):,.0f}/s, "
            f"{self.frames / max(self.cpu_s, 1e-9):,.0f} per CPU second)",
            "  orders: "
            + ", ".join(
                f"{side} {o['requested', side]} (filled {o['filled', side]}, rejected "
                f"{o['rejected', side]}"
                + (f", {n} in flight at the end)" if (n := self.in_flight(side)) else ")")
                for side in ("buy", "sell")
            ),
            f"  entries {self.entries}, {self.bought_sol:.3f} SOL; closed "
            f"{self.closed_positions}, open {self.open_positions}",
            f"  exits by rule: {self.exits_text() or 'none'}",
            f"  sales by rule: {self.sales_text() or 'none'}",
            f"  PnL after fees: realised {self.realized_sol:+.4f} SOL, open marked "
            f"{self.unrealized_sol:+.4f}{unmarked_note(self.unmarked)}, total {self.pnl:+.4f} "
            f"(fees {self.fees_sol:.4f})",
            f"  win rate {_share(self.win_rate)}; max drawdown (realised) "
            f"{self.max_drawdown_sol:.4f} SOL",
            *(
                [f"  by arm: {report_results.pnl_by_arm_text(by_arm)}"]
                if (by_arm := self.pnl_by_arm())
                else []
            ),
            f"  predictions {self.predictions_text()}; live AUC "
            + self.auc_text()
            + "; precision "
            + self.precision_text(),
            f"  {no_order_line(dict(self.skipped.most_common()))}",
            f"  breakers tripped: {', '.join(sorted(self.breakers)) or 'none'}",
        ]
        return "\n".join(lines)


def _sol(value: float) -> float:
    # sums of the same fills in another order differ in the last bits
    return round(float(value), 9)


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else value


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


class _Counter:
    """A bus handler that counts the orders it is delivered, by kind and side."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    async def __call__(self, event) -> None:
        side = getattr(event.data, "side", None) or "buy"
        self.counts[event.type.removeprefix("order."), side] += 1


async def _swallow(ws) -> None:
    async for _ in ws:  # the feed's subscribe messages: nothing is sent back
        pass


async def run_backtest(
    frames: Frames,
    config: Mapping[str, Any] | None = None,
    *,
    name: str = "run",
    progress: Progress | None = None,
    partitions: int = PARTITIONS,
    observe: Callable[[Any], Any] | None = None,
) -> Report:
    """Hand every frame to the embedded system on the replay clock; report at the end.

    ``observe`` (an async bus handler) is handed every event the system publishes.
    """
    from prometheus_client import CollectorRegistry
    from websockets.asyncio.server import serve

    from pumpflow.activity.service import ActivityService
    from pumpflow.common.bus.abc import Subscription
    from pumpflow.common.clock import ReplayClock
    from pumpflow.common.runtime.embedded import run_embedded
    from pumpflow.exit.service import ExitService
    from pumpflow.features.service import FeaturesService
    from pumpflow.feed.service import FeedService
    from pumpflow.model.service import ModelService
    from pumpflow.report.gather import Collector, model_figures, stream_performance
    from pumpflow.report.results import max_drawdown
    from pumpflow.trading.service import TradingService

    overrides = service_overrides(config or {})
    # the feed holds a real connection to a local socket that sends nothing: it runs
    # connected (subscribing new mints) while its frames come from here
    server = await serve(_swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = ReplayClock(frames[0][0] if frames else SIM_START)

    def build(cls, **settings):
        settings = cls.settings_class.load(
            service=cls.name, transport="memory", partitions=partitions,
            **{**settings, **overrides.get(cls.name, {})},
        )  # fmt: skip
        return cls(settings, registry=CollectorRegistry())

    feed = build(
        FeedService, feed_record=False, pumpportal_ws_url=f"ws://127.0.0.1:{port}/api/data"
    )
    # a refit swapped in when its thread happens to finish would make the results hang
    # on the machine's speed: the replay scores with the models it starts with, unless
    # the config asks for refits
    model, trading = build(ModelService, model_refit=False), build(TradingService, **PAPER)
    services = [
        feed, build(FeaturesService), build(ActivityService), model, trading, build(ExitService)
    ]  # fmt: skip
    counter = _Counter()
    collector = Collector()

    async def drain(system) -> None:
        if not await system.drain(DRAIN_S):
            raise RuntimeError("the bus did not drain")

    try:
        async with run_embedded(services, clock=clock, partitions=partitions) as system:
            async with asyncio.timeout(10.0):
                await feed.socket.wait_connected()
            on_frame = feed.socket._on_frame  # what the socket reader calls per frame
            await system.bus.subscribe(Subscription(
                service="backtest", handler=counter,
                patterns=("order.requested", "order.filled", "order.rejected"),
            ))  # fmt: skip
            await collector.attach(system.bus)
            if observe is not None:
                await system.bus.subscribe(
                    Subscription(service="backtest-observer", handler=observe, patterns=("#",))
                )
            total = len(frames)
            next_tick = frames[0][0] + TICK_S if frames else 0.0
            gc.collect()
            if progress is not None:
                progress(0, total)
            started, cpu_started = time.perf_counter(), time.process_time()
            for done, (at, frame) in enumerate(frames):
                if at >= next_tick:
                    # what came before is handled at its own time, then the timers run
                    await drain(system)
                    await clock.advance_to(at)
                    await drain(system)
                    next_tick = at + TICK_S
                    if progress is not None:
                        progress(done, total)
                else:
                    clock.set_sync(at)
                await on_frame(frame)
            await drain(system)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            if progress is not None:
                progress(total, total)
            performance = await stream_performance(model)
            figures = model_figures(model, performance)
            book = trading.book
            counts = counter.counts
            report_data = await collector.results(
                system,
                title=f"pumpflow backtest: {name}",
                source=counted(total, "frame"),
                performance=performance,
            )
            # every position, from the ledger: the book keeps the latest closed ones only
            positions = report_data.trades
            closed = report_data.closed
            return Report(
                name=name,
                frames=total,
                seconds=seconds,
                cpu_s=cpu,
                predictions=model.metrics.published(),
                predicted=figures.predicted,
                orders=Counter({k: v for k, v in counts.items() if isinstance(k, tuple)}),
                entries=len(positions),
                bought_sol=sum(p.bought_sol for p in positions),
                realized_sol=book.realized_pnl_sol,
                unrealized_sol=book.unrealized_pnl_sol,
                open_positions=book.open_count,
                unmarked=book.unmarked_count,
                closed_positions=len(closed),
                wins=sum(p.realized_pnl_sol > 0 for p in closed),
                fees_sol=sum(p.fees_sol for p in positions),
                max_drawdown_sol=max_drawdown(report_data),
                exits=report_results.exits_by_rule(report_data),
                auc=figures.auc,
                precision=figures.precision,
                selected=figures.selected,
                skipped=Counter(trading.skipped),
                breakers=Counter(
                    name for name, b in trading.risk.breakers.items() if b.last_fault is not None
                ),
                report_data=report_data,
            )
    finally:
        server.close()
        await server.wait_closed()


class ProgressLine:
    """A plain progress line with an ETA on ``out``, at most every ``every`` wall seconds
    (for logs and pipes), timed from its first call (a configuration waiting for a worker
    has not started)."""

    def __init__(self, label: str, *, every: float = 2.0, out: TextIO = sys.stderr):
        self.label, self.every, self.out = label, every, out
        self._started = self._last = math.nan

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if math.isnan(self._started):
            self._started = self._last = now
        if now - self._last < self.every and done < total:
            return
        self._last = now
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        print(
            f"{self.label}: {done:,}/{total:,} frames ({done / max(total, 1):.0%}), "
            f"{rate:,.0f}/s, ETA {eta:.0f} s",
            file=self.out,
            flush=True,
        )

    def close(self) -> None:
        pass


class ProgressBars:
    """Progress bars with the rate and an ETA, one per label, drawn together on a
    terminal ``out`` (rich); each appears at its first call."""

    def __init__(self, *, out: TextIO = sys.stderr):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bars = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("frames, {task.fields[rate]}/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=out, force_terminal=True),
        )
        self.drawn = False

    def bar(self, label: str) -> Progress:
        """The progress of ``label``, as its bar."""
        task: Any = None
        started = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal task, started
            if not self.drawn:
                self._bars.start()
                self.drawn = True
            if task is None:
                task = self._bars.add_task(label, total=total, rate="-")
                started = time.perf_counter()
            elapsed = time.perf_counter() - started
            rate = f"{done / elapsed:,.0f}" if elapsed > 0 else "-"
            self._bars.update(task, completed=done, rate=rate)

        return progress

    def close(self) -> None:
        if self.drawn:
            self._bars.stop()
            self.drawn = False


class ProgressBar(ProgressBars):
    """One progress bar, of ``label``."""

    def __init__(self, label: str, *, out: TextIO = sys.stderr):
        super().__init__(out=out)
        self.label = label
        self._progress = self.bar(label)

    def __call__(self, done: int, total: int) -> None:
        self._progress(done, total)


def progress_for(label: str, *, every: float, out: TextIO = sys.stderr) -> Progress:
    """A bar on a terminal, plain lines otherwise (or when rich is missing)."""
    if out.isatty():
        try:
            return ProgressBar(label, out=out)
        except ImportError:
            pass
    return ProgressLine(label, every=every, out=out)


class ProgressBoard:
    """The progress of configurations running at once, by name: a bar each, together,
    on a terminal ``out``; plain lines each otherwise (or when rich is missing)."""

    def __init__(self, labels: Sequence[str], *, every: float, out: TextIO = sys.stderr):
        self._bars: ProgressBars | None = None
        if out.isatty():
            try:
                self._bars = ProgressBars(out=out)
            except ImportError:
                pass
        self.progress: dict[str, Progress] = {
            label: self._bars.bar(label)
            if self._bars is not None
            else ProgressLine(label, every=every, out=out)
            for label in labels
        }

    @property
    def drawn(self) -> bool:
        """Whether bars are drawn in place now: a line written meanwhile would tear them."""
        return self._bars is not None and self._bars.drawn

    def close(self) -> None:
        if self._bars is not None:
            self._bars.close()


def _arms(figures: Mapping[str, float]) -> str:
    """Each "model/arm"'s live figure, named when there are several."""
    if len(figures) == 1:
        return figure_text(next(iter(figures.values())))
    return ", ".join(f"{arm} {figure_text(value)}" for arm, value in figures.items()) or "n/a"


#: the comparison's columns, one row per configuration
COMPARISON_COLUMNS = (
    "config", "orders buy/sell (filled, rejected)", "entries", "closed (win rate)",
    "exits by rule", "realised", "open, marked", "PnL (SOL)", "max drawdown", "predictions",
    "live AUC", "precision",
)  # fmt: skip


def comparison_rows(reports: Sequence[Report]) -> list[tuple[str, ...]]:
    """One row of :data:`COMPARISON_COLUMNS` per configuration."""
    rows = []
    for r in reports:
        o = r.orders
        rows.append((
            r.name,
            f"{o['requested', 'buy']}/{o['requested', 'sell']} "
            f"({o['filled', 'buy'] + o['filled', 'sell']}, "
            f"{o['rejected', 'buy'] + o['rejected', 'sell']})",
            f"{r.entries}",
            f"{r.closed_positions} ({_share(r.win_rate)})",
            r.exits_text() or "-",
            f"{r.realized_sol:+.4f}",
            f"{r.unrealized_sol:+.4f} ({r.open_positions}){unmarked_note(r.unmarked)}",
            f"{r.pnl:+.4f}",
            f"{r.max_drawdown_sol:.4f}",
            f"{r.predictions:,}",
            _arms({arm: a for arm, (a, _) in r.auc.items()}),
            _arms({arm: p for arm, (p, _) in r.precision.items()}),
        ))  # fmt: skip
    return rows


def comparison_table(reports: Sequence[Report]) -> str:
    """One row per configuration, in markdown."""
    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(reports)]
    return "\n".join(lines)


def comparison_json(
    source: str,
    base: Mapping[str, Any],
    changes: Mapping[str, Mapping[str, Any]],
    reports: Sequence[Report],
    failed: Sequence[Failed] = (),
) -> dict[str, Any]:
    """The base, the settings each configuration (by name) changes over it, as they ran,
    and its results (``results`` equal for equal inputs; the wall and CPU seconds apart,
    under ``timing``); the configurations that failed, with why."""
    return {
        "source": source,
        "frames": reports[0].frames if reports else 0,
        "base": dict(base),
        "configurations": [
            {
                "name": report.name,
                "settings": dict(changes[report.name]),
                "results": report.results(),
                "timing": {"seconds": report.seconds, "cpu_s": report.cpu_s},
            }
            for report in reports
        ],
        "failed": [
            {"name": f.name, "settings": dict(changes[f.name]), "error": f.reason} for f in failed
        ],
    }


# ------------------------------------------------------------------ running them


@dataclass(frozen=True)
class Failed:
    """A configuration whose run raised: its name, why (the exception, in a line) and
    where (its traceback)."""

    name: str
    reason: str
    traceback: str = ""

    def text(self) -> str:
        return f"configuration {self.name!r} failed: {self.reason}"


Outcome = Report | Failed
#: (name, settings over the base's) of each configuration to run
Runs = Sequence[tuple[str, Mapping[str, Any]]]


@contextlib.contextmanager
def warnings_unsaid() -> Iterator[None]:
    """Log nothing below an error while the block runs, then as before."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def run_configuration(
    frames: Frames,
    name: str,
    config: Mapping[str, Any],
    progress: Progress | None = None,
    *,
    quiet: bool = False,
) -> Outcome:
    """Run one configuration on ``frames``: its report, or its failure (the other
    configurations' reports are not lost to it); ``quiet``: its services' warnings
    unsaid."""
    try:
        with warnings_unsaid() if quiet else contextlib.nullcontext():
            return asyncio.run(run_backtest(frames, config, name=name, progress=progress))
    except Exception as exc:
        return Failed(name, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def run_in_process(
    frames: Frames,
    runs: Runs,
    *,
    progress: Callable[[str], Progress] | None,
    quiet: bool = False,
) -> Iterator[tuple[int, Outcome]]:
    """Run the configurations here, one after the other: (index, outcome) of each.
    ``progress`` makes a configuration's progress (None: none shown); ``quiet``: the
    services' warnings unsaid."""
    for index, (name, config) in enumerate(runs):
        shown = progress(name) if progress is not None else None
        try:
            outcome = run_configuration(frames, name, config, shown, quiet=quiet)
        finally:
            if shown is not None:
                shown.close()
        yield index, outcome


#: what the forkserver imports once, before it forks each worker: a worker then starts
#: in milliseconds, not the second these take
WORKER_PRELOAD = (
    "pumpflow.cli.backtest", "pumpflow.feed.service",
    "pumpflow.features.service", "pumpflow.activity.service", "pumpflow.model.service",
    "pumpflow.trading.service", "pumpflow.exit.service", "pumpflow.report.gather",
    "websockets.asyncio.server",
)  # fmt: skip
#: wall seconds between a worker's progress messages, at most
WORKER_PROGRESS_S = 0.1
#: wall seconds between looks at the workers for one that died
WORKER_WATCH_S = 0.5


def worker_context() -> Any:
    """Workers forked from a forkserver that holds the system imported, where there is
    one (no asyncio state forked with them, as a fork of this process would), else
    spawned."""
    import multiprocessing
    from multiprocessing import forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    # started with SIGINT ignored, as it and the workers it forks then keep it: the
    # terminal's Ctrl-C reaches every process of its group, and the parent stops the
    # workers itself (one interrupted starting would print its traceback over its lines)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)
    return context


class _Relay:
    """A worker's progress on a configuration, sent to the parent at most every
    :data:`WORKER_PROGRESS_S`."""

    def __init__(self, sent: Any, index: int):
        self.sent, self.index = sent, index
        self._last = -math.inf

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self._last < WORKER_PROGRESS_S and 0 < done < total:
            return
        self._last = now
        self.sent.send(("progress", self.index, (done, total)))


def _work(
    frames: Frames, environment: dict[str, str], parent: Any, show_progress: bool, quiet: bool
) -> None:
    """A worker: run each configuration the parent hands it on ``parent``, a pipe of its
    own, and send back what it makes, until the parent hands None or is gone (its end
    of the pipe closed with it: a worker waiting on a queue would wait for ever). A queue
    the workers shared would be locked for ever by one killed while it wrote."""
    # Ctrl-C: the parent stops the workers (a forkserver's ignore it from their start)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a forkserver's children have its environment, from when it started: the settings
    # are read from the parent's, as they are in the parent
    os.environ.clear()
    os.environ.update(environment)
    try:
        while (task := parent.recv()) is not None:
            index, name, config = task
            progress = _Relay(parent, index) if show_progress else None
            outcome = run_configuration(frames, name, config, progress, quiet=quiet)
            try:
                report = pickle.dumps(outcome)
            except Exception as exc:
                report = pickle.dumps(Failed(name, f"its report could not be sent: {exc!r}"))
            parent.send(("finished", index, report))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone: nobody waits for the rest


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it: a worker's start cut while its
    process and frames are written to it would leave it a truncated copy. (A signal mask
    would not do: a signal comes in on any thread that does not block it, onnxruntime's
    included, and Python raises it in the main thread all the same.)"""
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt


def run_in_workers(
    frames: Frames,
    runs: Runs,
    *,
    jobs: int,
    progress: Mapping[str, Progress] | None,
    quiet: bool = False,
) -> Iterator[tuple[int, Outcome]]:
    """Run the configurations in ``jobs`` worker processes, each handed the frames once
    (pickled: some 7 ms for 10 market minutes, 7 MB); (index, outcome) of each as it
    finishes. ``progress``: each configuration's, by name (None: none shown); ``quiet``:
    the services' warnings unsaid."""
    from multiprocessing.connection import wait

    context = worker_context()
    environment = dict(os.environ)
    pending = list(enumerate(runs))[::-1]
    workers: dict[int, Any] = {}
    pipes: dict[Any, int] = {}  # this end of a worker's pipe -> its slot
    running: dict[int, int] = {}  # worker slot -> configuration index

    def start(slot: int) -> None:
        mine, theirs = context.Pipe()
        workers[slot] = context.Process(
            target=_work, name=f"pumpflow-backtest-{slot}", daemon=True,
            args=(frames, environment, theirs, progress is not None, quiet),
        )  # fmt: skip
        try:
            with interrupts_held():
                workers[slot].start()
        finally:
            # the worker's end is its own: gone with it, the pipe reads as ended here
            theirs.close()
        pipes[mine] = slot
        hand(slot, mine)

    def hand(slot: int, pipe: Any) -> None:
        if pending:
            index, (name, config) = pending.pop()
            running[slot] = index
            pipe.send((index, name, dict(config)))
        else:
            pipe.send(None)

    try:
        for slot in range(min(jobs, len(runs))):
            start(slot)
        while running:
            for pipe in wait(list(pipes), timeout=WORKER_WATCH_S):
                slot = pipes[pipe]
                try:
                    kind, index, data = pipe.recv()
                except EOFError:
                    # killed (out of memory, a signal): its configuration with it
                    del pipes[pipe]
                    pipe.close()
                    workers[slot].join()
                    if slot in running:
                        index = running.pop(slot)
                        why = f"its worker died (exit code {workers[slot].exitcode})"
                        yield index, Failed(runs[index][0], why)
                        if pending:
                            start(slot)
                    continue
                if kind == "progress":
                    if progress is not None:
                        progress[runs[index][0]](*data)
                    continue
                del running[slot]
                hand(slot, pipe)
                yield index, pickle.loads(data)
    finally:
        # a worker still waiting for its next configuration ends as its pipe closes
        for pipe in pipes:
            pipe.close()
        started = [worker for worker in workers.values() if worker.pid is not None]
        for worker in started:
            if worker.is_alive():
                worker.terminate()
        for worker in started:
            worker.join()


# ------------------------------------------------------------------ the command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backtest",
        help="replay a dataset, a simulated or a recorded stream through the whole system",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset", metavar="FILE.jsonl",
        help="a `pumpflow sim dataset` or `pumpflow record --out` file",
    )  # fmt: skip
    source.add_argument("--seed", type=int, help="simulate this market seed here")
    source.add_argument(
        "--dsn", type=postgres_dsn, help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)"
    )
    parser.add_argument(
        "--schema", type=schema_name, help="Postgres schema (default: PUMPFLOW_NAMESPACE)"
    )
    parser.add_argument(
        "--start", type=epoch_time, help="Postgres: first event time (epoch s or ISO, UTC)"
    )
    parser.add_argument(
        "--end", type=epoch_time, help="Postgres: end of the window (epoch s or ISO, UTC)"
    )
    parser.add_argument("--minutes", type=positive, help="--seed: market minutes (10)")
    parser.add_argument(
        "--launches", type=positive, help="--seed: token launches per market minute (30)"
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="NAME=KEY=VALUE,...",
        help="a configuration to run (repeatable): the settings it changes over the base, "
        "pumpflow run's trading settings (NAME alone: the base); KEYs are trading, exit or "
        "model settings (a list or mapping as JSON)",
    )  # fmt: skip
    parser.add_argument(
        "--configs", metavar="FILE.toml",
        help="configurations from a TOML file, one table each, run after --config's",
    )  # fmt: skip
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2,...",
        help="sweep a setting over these values (repeatable): one configuration per point "
        "of the grids' product, over each --config/--configs one or over the base, named "
        f"by its values (at most {GRID_CAP})",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=count, metavar="N",
        help="configurations run at once, each in a worker process (default: the CPUs "
        "this process may use; 1: one after the other, here)",
    )  # fmt: skip
    parser.add_argument(
        "--json", metavar="FILE.json", dest="json_out",
        help="also write the base and every configuration's settings and results here "
        "(- for stdout)",
    )  # fmt: skip
    parser.add_argument(
        "--every", type=positive, default=2.0,
        help="wall seconds between progress lines when stderr is no terminal (2)",
    )  # fmt: skip
    parser.add_argument(
        "--quiet", action="store_true",
        help="no progress bar or lines, nor the services' warnings",
    )  # fmt: skip
    parser.add_argument(
        "--report", metavar="FILE.html", help="the HTML report (reports/backtest-...html)"
    )
    parser.set_defaults(handler=backtest_command)


#: the flags that shape each source's stream, by source
SOURCE_FLAGS = {
    "--seed": ("minutes", "launches"),
    "Postgres history": ("schema", "start", "end"),
}


def check_source_flags(args: argparse.Namespace) -> None:
    """Refuse flags of a source the command does not read: ignored, they would leave a
    run of another stream than the one asked for (a whole dataset for ``--minutes 1``)."""
    if args.dataset:
        source = "--dataset"
    else:
        source = "--seed" if args.seed is not None else "Postgres history"
    stray = [
        f"--{flag}"
        for other, flags in SOURCE_FLAGS.items()
        if other != source
        for flag in flags
        if getattr(args, flag) is not None
    ]
    if stray:
        raise UsageError(f"{', '.join(stray)}: not for {source}")
    check_window(args.start, args.end)


def backtest_command(args: argparse.Namespace) -> int:
    check_source_flags(args)
    try:
        configs: list[tuple[str, dict[str, Any]]] = [parse_config(t) for t in args.config]
        if args.configs:
            configs += read_configs(args.configs)
        if args.grid:
            configs = grid_configs([parse_grid(text) for text in args.grid], configs)
        configs = configs or [("run", {})]
        base = run_config()
        # what each configuration changes over the base, as it runs: the reports show these
        changes: dict[str, dict[str, Any]] = {}
        for name, config in configs:
            ran = check_config(name, {**base, **config})
            changes[name] = {key: ran[key] for key in config}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if twice := [name for name, n in Counter(name for name, _ in configs).items() if n > 1]:
        named = ", ".join(map(repr, twice))
        raise UsageError(f"configuration {named} given twice: names must differ")
    for name, _ in configs:
        if "/" in name or "\0" in name:
            raise UsageError(
                f"configuration {name!r}: a name without '/' (it names "
                f"the configuration's report file)"
            )
        if name == COMPARISON and len(configs) > 1:
            raise UsageError(
                f"configuration {name!r}: the name of the report comparing the "
                f"configurations: give it another"
            )
    if args.report and args.json_out and args.json_out != "-":
        beside = {
            backtest_report_path(args.report, name, several=len(configs) > 1)
            .with_suffix(".json")
            .resolve()
            for name, _ in configs
        }
        if Path(args.json_out).resolve() in beside:
            raise UsageError(
                f"--json {args.json_out} is where the results of the report "
                f"are saved (beside --report {args.report}): give the document another name"
            )
    several = len(configs) > 1
    # where the reports go (the reports folder without --report), before any runs
    for name in [name for name, _ in configs] + ([COMPARISON] if several else []):
        report_writable(backtest_report_path(args.report, name, several=several), flag="--report")
    if args.json_out and args.json_out != "-":
        writable(args.json_out)
    if args.dataset:
        frames, source = dataset_frames(args.dataset), args.dataset
    elif args.seed is not None:
        minutes = 10.0 if args.minutes is None else args.minutes
        frames = simulated_frames(args.seed, minutes, launches_per_minute=args.launches)
        source = f"seed {args.seed}, {counted(minutes, 'minute')}"
        if args.launches is not None:
            source += f", {args.launches:g} launches a minute"
    else:
        from pumpflow.common.runtime.settings import CommonSettings

        settings = CommonSettings.load(service="backtest")
        schema = args.schema or settings.namespace
        from pumpflow.common.db.pool import NoSuchSchema

        try:
            frames = asyncio.run(
                database_frames(args.dsn or settings.postgres_dsn, schema, args.start, args.end)
            )
        except NoSuchSchema as exc:  # a flag naming nothing
            raise UsageError(f"{exc}: no history to replay") from None
        source = postgres_source(schema, args.start, args.end)
    if not frames:
        raise SystemExit(f"pumpflow backtest: no frames in {source}")
    named = bool(args.config or args.configs or args.grid)
    for name, config in configs:
        check_models(name if named else None, {**base, **config}, frames[0][0])
    # with --json - stdout is the JSON document alone, for machines
    said = sys.stderr if args.json_out == "-" else sys.stdout
    print(f"pumpflow backtest: {counted(len(frames), 'frame')} from {source}; "
          f"{counted(len(configs), 'configuration')}", file=said, flush=True)  # fmt: skip
    if (note := paper_note("backtest")) is not None:
        print(note, file=said, flush=True)
    runs = [(name, {**base, **config}) for name, config in configs]
    jobs = min(args.jobs or len(os.sched_getaffinity(0)), len(runs))
    board = None
    if jobs == 1:
        outcomes = run_in_process(frames, runs, quiet=args.quiet, progress=None if args.quiet else (
            lambda name: progress_for(name, every=args.every, out=sys.stderr)
        ))  # fmt: skip
    else:
        if not args.quiet:
            board = ProgressBoard([n for n, _ in runs], every=args.every, out=sys.stderr)
        outcomes = run_in_workers(
            frames, runs, jobs=jobs, progress=board.progress if board is not None else None,
            quiet=args.quiet,
        )  # fmt: skip
    # each configuration's report in the order given, as soon as those before it are in
    ran: list[Outcome | None] = [None] * len(runs)
    said_up_to = 0

    def say_due() -> None:
        nonlocal said_up_to
        while said_up_to < len(ran) and (outcome := ran[said_up_to]) is not None:
            if isinstance(outcome, Failed):
                print(outcome.traceback + f"pumpflow backtest: {outcome.text()}",
                      file=sys.stderr, flush=True)  # fmt: skip
            else:
                print(outcome.text(), file=said, flush=True)
            said_up_to += 1

    try:
        for index, outcome in outcomes:
            ran[index] = outcome
            if board is None or not board.drawn:
                say_due()
    finally:
        if board is not None:
            board.close()
    say_due()
    reports = [outcome for outcome in ran if isinstance(outcome, Report)]
    failed = [outcome for outcome in ran if isinstance(outcome, Failed)]
    if several and reports:
        print(comparison_table(reports), file=said, flush=True)
    if args.json_out:
        document = json.dumps(
            comparison_json(source, base, changes, reports, failed), indent=2, default=str
        )
        if args.json_out == "-":
            print(document, flush=True)
        else:
            with open(args.json_out, "w", encoding="utf-8") as out:
                out.write(document + "\n")
    write_backtest_reports(
        reports, args.report, source=source, base=base, settings=changes, several=several,
        said=said,
    )  # fmt: skip
    if several and reports:
        write_backtest_comparison(
            reports, args.report, source=source, base=base, settings=changes,
            columns=COMPARISON_COLUMNS, rows=comparison_rows(reports), said=said,
        )  # fmt: skip
    if failed:
        print(f"pumpflow backtest: {counted(len(failed), 'configuration')} failed: "
              f"{', '.join(f.name for f in failed)}", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    return 0
