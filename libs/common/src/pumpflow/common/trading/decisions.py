"""Entry decisions: what trading knows of a token, and whether to enter it.

:class:`DecisionPolicy` is the one place entries are decided, for paper and live
alike: from the model's latest prediction, the token's lifecycle (state and
priority) and its latest features vector, through :class:`EntryFilters`. It is pure:
the facts come in a :class:`TokenView`, the time as an argument.

Features read (names of the default feature set, see
:func:`pumpflow.common.features.default_feature_set`): :data:`FILTER_FEATURES`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from pumpflow.common.curve import CurveState
from pumpflow.common.events import Event, ModelPrediction, TokenLifecycle, source_service
from pumpflow.common.priority import Priority
from pumpflow.common.trading.paper import Market
from pumpflow.common.trading.reasons import Reason
from pumpflow.common.trading.settings import EntryFilters

#: lifecycle states a token may be entered in
ENTRY_STATES = frozenset({"new", "active"})

FILTER_FEATURES = (
    "time_since_launch",
    "curve_progress",
    "creator_holding_share",
    "creator_sold",
    "buy_volume_sol_60s",
    "unique_traders",
    "top_buyer_share",
)


def derived_id(purpose: str, source_id: str) -> str:
    """An id made from ``source_id`` for ``purpose``: the same source always gives the
    same id, so whatever is redelivered or replayed names the same thing again."""
    return hashlib.blake2b(f"{purpose}:{source_id}".encode(), digest_size=16).hexdigest()


def order_id_for(cause_id: str, purpose: str = "entry") -> str:
    """The order id caused by event ``cause_id``: the same cause always gives the same id,
    so a redelivered or replayed event can never send a second order."""
    return f"{purpose}-{derived_id(purpose, cause_id)}"


def retaken_id(order_id: str) -> str:
    """The id of an entry decided again after the order ``order_id`` was withdrawn unsent
    (its id taken in the ledger): derived from it, so every replica deciding it again
    names the same order."""
    return order_id_for(order_id, "retaken")


@dataclass(slots=True)
class TokenView:
    """What trading knows of one token, from its events."""

    mint: str
    name: str | None = None
    symbol: str | None = None
    creator: str | None = None
    created_at: float | None = None
    #: the curve as of the token's last trade (None before any, or after migration)
    curve: CurveState | None = None
    migrated: bool = False
    #: where the token trades and its state there (the pool after migration), for marks
    market: Market = field(default_factory=Market)
    lifecycle: TokenLifecycle | None = None
    prediction: ModelPrediction | None = None
    #: the latest features vector, by name
    features: dict[str, float] = field(default_factory=dict)
    features_time: float | None = None
    #: publisher service -> the last seq of its events folded in here (stored with the
    #: view, as the keyed consumer's tracking record keeps it): one not above it is a
    #: redelivery, folded in already
    applied: dict[str, int] = field(default_factory=dict)
    #: the ids of trading's paper fills on the pool that moved ``market`` (which the
    #: stream never reports): the ledger holds every fill, and the view is stored after
    #: it, so a take-over moves the pool by those the stored view lacks
    pool_fills: list[str] = field(default_factory=list)


def admit_seq(applied: dict[str, int], event: Event) -> bool:
    """Take ``event``'s seq into ``applied`` (publisher service -> the last seq of its
    events of one token taken); False for a redelivery, a seq not above its publisher's
    last, which must change nothing. Each publisher numbers its own events of a token,
    so another's seq says nothing of this one's. An event without a seq is taken."""
    seq = event.seq
    if seq is None:
        return True
    publisher = source_service(event.source)
    if seq <= applied.get(publisher, 0):
        return False
    applied[publisher] = seq
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryDecision:
    """Whether to enter a token, and what the sizing reads: confidence and priority."""

    mint: str
    enter: bool
    #: why not (empty when entering)
    reasons: tuple[Reason, ...] = ()
    score: float | None = None
    #: the score's place between ``min_score`` (0) and 1 (1)
    confidence: float = 0.0
    priority: int = Priority.IDLE


def _contains_any(text: str | None, needles: tuple[str, ...]) -> str | None:
    if not text:
        return None
    folded = text.strip().casefold()
    for needle in needles:
        if needle.strip().casefold() in folded:
            return needle
    return None


class DecisionPolicy:
    """Decides entries from a token's prediction, lifecycle and features."""

    def __init__(self, filters: EntryFilters | None = None):
        self.filters = filters or EntryFilters()

    def filter_reasons(self, view: TokenView, features: Mapping[str, float]) -> list[Reason]:
        """Every entry filter the token fails, as reasons (empty: it passes them all)."""
        f = self.filters
        reasons: list[Reason] = []
        missing = [n for n in FILTER_FEATURES if n not in features]
        if missing:
            return [Reason.fixed(f"features lack {missing}")]
        if view.created_at is None:
            # a token first seen by a trade (one made by hand from the wallet, a stream
            # joined late): its age and creator, counted from that trade, are guesses
            reasons.append(Reason.fixed("creation not seen"))
        age = features["time_since_launch"]
        if not f.min_age_s <= age <= f.max_age_s:
            reasons.append(
                Reason.observed(
                    "age {}s outside {low:g}..{high:g}s",
                    f"{age:.0f}",
                    low=f.min_age_s,
                    high=f.max_age_s,
                )
            )
        progress = features["curve_progress"]
        if not f.min_curve_progress <= progress <= f.max_curve_progress:
            reasons.append(
                Reason.observed(
                    "curve progress {} outside {low:.0%}..{high:.0%}",
                    f"{progress:.1%}",
                    low=f.min_curve_progress,
                    high=f.max_curve_progress,
                )
            )
        holding = features["creator_holding_share"]
        if holding > f.max_creator_holding_share:
            reasons.append(
                Reason.observed(
                    "creator holds {} > {most:.1%}",
                    f"{holding:.1%}",
                    most=f.max_creator_holding_share,
                )
            )
        if f.reject_creator_sold and features["creator_sold"] > 0:
            reasons.append(Reason.fixed("creator sold"))
        volume = features["buy_volume_sol_60s"]
        if volume < f.min_buy_volume_sol_60s:
            reasons.append(
                Reason.observed(
                    "bought {} SOL in 60s < {least:g}",
                    f"{volume:.2f}",
                    least=f.min_buy_volume_sol_60s,
                )
            )
        traders = features["unique_traders"]
        if traders < f.min_unique_traders:
            reasons.append(
                Reason.observed(
                    "{} traders < {least}", f"{traders:.0f}", least=f.min_unique_traders
                )
            )
        top = features["top_buyer_share"]
        if top > f.max_top_buyer_share:
            reasons.append(
                Reason.observed(
                    "top buyer {} of buys > {most:.0%}", f"{top:.0%}", most=f.max_top_buyer_share
                )
            )
        if f.name_blocklist:
            if view.name is None and view.symbol is None:
                reasons.append(Reason.fixed("name unknown (block list set)"))
            else:
                hit = _contains_any(view.name, f.name_blocklist) or _contains_any(
                    view.symbol, f.name_blocklist
                )
                if hit is not None:
                    # the block list's entry is a setting: each says what it blocks
                    reasons.append(Reason.fixed(f"name blocked ({hit!r})"))
        if f.creator_blocklist:
            if view.creator is None:
                reasons.append(Reason.fixed("creator unknown (block list set)"))
            elif view.creator in f.creator_blocklist:
                reasons.append(Reason.fixed("creator blocked"))
        return reasons

    def decide(self, view: TokenView, features: Mapping[str, float] | None = None) -> EntryDecision:
        """Enter ``view``'s token or not, on ``features`` (default: the view's latest)."""
        features = view.features if features is None else features
        reasons: list[Reason] = []
        lifecycle = view.lifecycle
        priority = Priority.IDLE
        if view.migrated:
            reasons.append(Reason.fixed("graduated"))
        if lifecycle is None:
            reasons.append(Reason.fixed("lifecycle unknown"))
        else:
            priority = Priority(min(max(lifecycle.priority, 0), Priority.URGENT))
            if lifecycle.state not in ENTRY_STATES:
                reasons.append(Reason.fixed(f"lifecycle {lifecycle.state}"))
            elif priority <= Priority.LOW:
                reasons.append(Reason.fixed(f"priority {priority.name}"))
        prediction = view.prediction
        score = None
        confidence = 0.0
        if prediction is None:
            reasons.append(Reason.fixed("no prediction"))
        else:
            score = prediction.score
            if not score >= self.filters.min_score:
                reasons.append(
                    Reason.observed(
                        "score {} < {least:g}", f"{score:.3f}", least=self.filters.min_score
                    )
                )
            else:
                span = 1.0 - self.filters.min_score
                confidence = min(1.0, (score - self.filters.min_score) / span) if span else 1.0
        if view.curve is None and not view.migrated:
            reasons.append(Reason.fixed("no curve state"))
        reasons += self.filter_reasons(view, features)
        return EntryDecision(
            mint=view.mint,
            enter=not reasons,
            reasons=tuple(reasons),
            score=score,
            confidence=confidence,
            priority=int(priority),
        )
