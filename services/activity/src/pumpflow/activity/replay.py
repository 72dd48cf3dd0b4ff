"""What-if replay of adaptive subscriptions over a stream of PumpPortal frames.

Runs what the features and activity services run, in one process on a ReplayClock,
over ``(seconds, frame)`` pairs, as fast as possible: each token event is folded into
a :class:`~pumpflow.common.features.FeatureManager` (the features service's domain),
its vector read as activity metrics and handed to the
:class:`~pumpflow.common.activity.ActivityAnalyzer` (the activity service's
processor, hosted on the clock's timers). The feed is modelled: a token's
trades are streamed from its creation until it is retired (unsubscribed), after
which its trade frames are not delivered (and not paid for). Creations and
migrations come from the free feeds and are always delivered.

Used by the bounded-subscriptions test and ``benchmarks/activity_replay.py``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pumpflow.common.activity import (
    ActivityAnalyzer,
    ActivityMetricsReader,
    LifecycleThresholds,
    Transition,
)
from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import FeatureManager
from pumpflow.common.pumpportal import decode_token_frame


@dataclass(kw_only=True)
class ReplayReport:
    """Figures of one replay."""

    duration_s: float = 0.0
    launched: int = 0
    graduated: int = 0
    trade_frames: int = 0
    delivered_trades: int = 0
    #: trade frames of retired (unsubscribed) tokens, not streamed
    suppressed_trades: int = 0
    max_watched: int = 0
    mean_watched: float = 0.0
    transitions: dict[str, int] = field(default_factory=dict)
    #: mint -> event time of its retirement (unsubscribe)
    retired_at: dict[str, float] = field(default_factory=dict)
    #: mint -> event time of its last delivered trade (or its creation)
    last_activity: dict[str, float] = field(default_factory=dict)
    #: mint -> trade frames after its retirement (what was not streamed)
    after_retirement: dict[str, int] = field(default_factory=dict)
    #: (mint, minute) pairs with >= hot_trades trades in the full stream, and how many
    #: of them were streamed while the token was watched
    hot_minutes: int = 0
    hot_minutes_watched: int = 0
    wall_s: float = 0.0
    frames: int = 0

    @property
    def saved_share(self) -> float:
        return self.suppressed_trades / self.trade_frames if self.trade_frames else 0.0

    def summary(self) -> dict[str, Any]:
        late = sorted(self.after_retirement.values(), reverse=True)
        return {
            "simulated_s": round(self.duration_s, 1),
            "frames": self.frames,
            "launched": self.launched,
            "graduated": self.graduated,
            "max_watched": self.max_watched,
            "mean_watched": round(self.mean_watched, 1),
            "trade_frames": self.trade_frames,
            "delivered_trades": self.delivered_trades,
            "suppressed_trades": self.suppressed_trades,
            "saved_share": round(self.saved_share, 4),
            "hot_minutes": self.hot_minutes,
            "hot_minutes_watched": self.hot_minutes_watched,
            "retired": len(self.retired_at),
            "retired_then_traded_10plus": sum(1 for n in late if n >= 10),
            "max_trades_after_retirement": late[0] if late else 0,
            "transitions": dict(sorted(self.transitions.items())),
            "wall_s": round(self.wall_s, 2),
            "frames_per_s": round(self.frames / self.wall_s) if self.wall_s else 0,
        }


async def replay_subscriptions(
    frames: Iterable[tuple[float, Mapping[str, Any]]],
    *,
    start: float = 1_700_000_000.0,
    thresholds: LifecycleThresholds | None = None,
    sample_every_s: float = 5.0,
    hot_trades_per_minute: int = 6,
) -> ReplayReport:
    """Replay ``frames`` through features and activity with the feed modelled; return the
    figures."""
    clock = ReplayClock(start)
    report = ReplayReport()
    manager = FeatureManager()
    reader = ActivityMetricsReader()
    streamed: set[str] = set()
    transitions: dict[str, int] = defaultdict(int)

    def on_transition(t: Transition) -> None:
        if t.is_transition:
            transitions[t.state] += 1
            if t.previous_state == "inactive" and t.state == "active":
                streamed.add(t.mint)

    def on_retire(mint: str, state: str) -> None:
        # the features service drops a token that retires (its lifecycle event)
        manager.drop_token(mint)
        streamed.discard(mint)
        report.retired_at[mint] = clock.now()

    analyzer = ActivityAnalyzer(
        clock=clock, thresholds=thresholds, on_transition=on_transition, on_retire=on_retire
    )
    encode = msgspec.json.encode
    minute_trades: dict[tuple[str, int], int] = defaultdict(int)
    minute_watched: dict[tuple[str, int], bool] = {}
    next_sample = start
    samples = 0
    watched_sum = 0
    last_t = 0.0
    wall = time.perf_counter()
    for t, frame in frames:
        now = start + t
        await clock.advance_to(now)
        while next_sample <= now:
            watched = len(streamed)
            report.max_watched = max(report.max_watched, watched)
            watched_sum += watched
            samples += 1
            next_sample += sample_every_s
        report.frames += 1
        last_t = t
        payload = decode_token_frame(encode(frame))
        mint = payload.mint
        kind = payload.txType
        if kind == "create":
            report.launched += 1
            streamed.add(mint)
            report.last_activity[mint] = now
        elif kind == "migrate":
            report.graduated += 1
            analyzer.token_migrated(mint)
            continue
        else:
            report.trade_frames += 1
            slot = (mint, int(t // 60))
            minute_trades[slot] += 1
            if mint not in streamed:
                report.suppressed_trades += 1
                if mint in report.retired_at:
                    report.after_retirement[mint] = report.after_retirement.get(mint, 0) + 1
                continue
            minute_watched[slot] = True
            report.delivered_trades += 1
            report.last_activity[mint] = now
        state = manager.update_feature_history(payload, time=now)
        if state is None:
            continue
        # what activity reads from the features.updated of this event
        metrics = reader.read(manager.names, manager.values(state), time=now)
        analyzer.update_activity_metrics(mint, metrics)
        if not analyzer.is_live(mint):
            manager.drop_token(mint)
    report.wall_s = time.perf_counter() - wall
    report.duration_s = last_t
    report.mean_watched = watched_sum / samples if samples else 0.0
    report.transitions = dict(transitions)
    for slot, count in minute_trades.items():
        if count >= hot_trades_per_minute:
            report.hot_minutes += 1
            report.hot_minutes_watched += minute_watched.get(slot, False)
    analyzer.close()
    return report
