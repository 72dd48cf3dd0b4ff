"""The consumer groups of the deployment and what each consumes, declared before publishing.

A broker routes a message only to the queues bound when it is published: an event
published before its consumer group's queues exist is dropped, and publisher confirms
confirm it all the same. Services start in any order (``docker compose up``, a
restarted host), so a feed that connects a moment before features would lose the first
events of the first mints for it, for good. Every process therefore declares the shared
queues of every consumer group of the deployment as it connects, before its service
starts; what is published then waits in them for the group's first replica.

A declared group must run: its queues hold everything published for it until it does.
``CommonSettings.consumer_groups`` names the groups a deployment runs (all of these by
default). A service subscribing to less than its group declares is refused, since the
group's queues would hand it the rest.

Keyless events travel on per-replica broadcast queues that cannot be declared ahead of
their replica: what is published while a replica is away is lost to it. Their consumers
rebuild what they missed (the feed keeps its wanted mints in the store, and is not a
group here), or, where one replica of the group acts on them and none may miss one,
the group takes them on its shared queues (:data:`SHARED_KEYLESS`), declared here with
the rest: trading, whose one replica trading applies ``system.shutdown`` and the feed's
``feed.trade_stream``, published while none runs, as it takes over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pumpflow.common.activity import CONSUMES as ACTIVITY_CONSUMES
from pumpflow.common.bus.abc import EventBus
from pumpflow.common.events import (
    CircuitBreakerChanged,
    ExitOrder,
    ExitReport,
    FeaturesUpdated,
    FeedSubscription,
    FeedTradeStream,
    ModelDrift,
    ModelPrediction,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    PositionClosed,
    PositionOpened,
    PositionUpdated,
    SaleRequested,
    ShutdownBarrier,
    SystemShutdown,
    TokenCreated,
    TokenLifecycle,
    TokenMigrated,
    TokenTrade,
    TradingStateChanged,
)
from pumpflow.common.exit import CONSUMES as EXIT_CONSUMES
from pumpflow.common.exit import CONTROL_CONSUMES as EXIT_CONTROL_CONSUMES
from pumpflow.common.features.processor import CONSUMES as FEATURES_CONSUMES
from pumpflow.common.model.processor import CONSUMES as MODEL_CONSUMES
from pumpflow.common.trading import SERVICE_CONSUMES as TRADING_CONSUMES

#: consumer group (service name) -> the event-type patterns it consumes
CONSUMER_GROUPS: Mapping[str, tuple[str, ...]] = {
    "features": FEATURES_CONSUMES,
    "activity": ACTIVITY_CONSUMES,
    "model": MODEL_CONSUMES,
    "trading": TRADING_CONSUMES,
    "exit": EXIT_CONSUMES,
    # system.shutdown and trading's barrier: keyless, kept apart from the keyed queues
    "exit-control": EXIT_CONTROL_CONSUMES,
}

#: service -> the event types it publishes (the event catalogue's senders, checked
#: against what a whole embedded run publishes: tests/cli/test_catalogue.py)
PUBLISHERS: Mapping[str, tuple[str, ...]] = {
    "feed": (TokenCreated.TYPE, TokenTrade.TYPE, TokenMigrated.TYPE, FeedTradeStream.TYPE),
    "features": (FeaturesUpdated.TYPE,),
    "activity": (TokenLifecycle.TYPE, FeedSubscription.TYPE),
    "model": (ModelPrediction.TYPE, ModelDrift.TYPE),
    "trading": (
        OrderRequested.TYPE,
        OrderFilled.TYPE,
        OrderRejected.TYPE,
        PositionOpened.TYPE,
        PositionUpdated.TYPE,
        PositionClosed.TYPE,
        TradingStateChanged.TYPE,
        CircuitBreakerChanged.TYPE,
        ShutdownBarrier.TYPE,
        # live: the wallet whose trades the feed streams (accounts)
        FeedSubscription.TYPE,
    ),
    # system.shutdown and exit.sale_requested: through its API, for `pumpflow stop` and
    # `pumpflow sell`
    "exit": (ExitOrder.TYPE, ExitReport.TYPE, SystemShutdown.TYPE, SaleRequested.TYPE),
}


#: the groups that take their keyless events on queues shared by their replicas, not on
#: each replica's own (``Subscription.shared_keyless``; their services subscribe so)
SHARED_KEYLESS: frozenset[str] = frozenset({"trading"})


def groups_of(names: Iterable[str] | None) -> dict[str, tuple[str, ...]]:
    """The groups among ``names`` (None: every group); an unknown name is an error."""
    if names is None:
        return dict(CONSUMER_GROUPS)
    chosen = list(names)
    unknown = sorted(set(chosen) - set(CONSUMER_GROUPS))
    if unknown:
        raise ValueError(
            f"unknown consumer groups {unknown}: the groups are {sorted(CONSUMER_GROUPS)}"
        )
    return {name: CONSUMER_GROUPS[name] for name in chosen}


async def declare_groups(bus: EventBus, groups: Mapping[str, tuple[str, ...]]) -> None:
    """Declare ``groups``' shared queues on ``bus`` (idempotent)."""
    for service, patterns in groups.items():
        await bus.declare(service, patterns, shared_keyless=service in SHARED_KEYLESS)
