"""The features service: token events in, ``features.updated`` out, vectors in the store.

Settings, the :class:`~pumpflow.common.features.processor.FeaturesProcessor` on the
library's :class:`~pumpflow.common.consumer.KeyedStatefulConsumer`, and one view:
each token's latest vector as the store hash ``features:<mint>`` (values, version,
seq, out_seq, time, updated_at), written in the same commit as the token's state, so
a consumer that reads ``GET /features/{mint}`` on receipt of ``features.updated``
finds that vector or a newer one.

Postgres (the feed's stored events) is read only to rebuild a token that has no record
here: while it is away such a token waits for it, and the others go on, so the replica
stays ready (``/readyz`` names Postgres under ``degraded``), and a replica starting
then starts without it (the runner opens its pool in the background).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry

from pumpflow.common.consumer import ConsumerMetrics, KeyedStatefulConsumer
from pumpflow.common.dependencies import POSTGRES
from pumpflow.common.events import Event
from pumpflow.common.features import FeatureManager, FeatureVector
from pumpflow.common.features.processor import FeaturesProcessor
from pumpflow.common.features.state import TokenState
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.state.feature_cache import FeatureCache
from pumpflow.common.storage.token_events import feed_history
from pumpflow.features.metrics import FeaturesMetrics
from pumpflow.features.settings import FeaturesSettings

FEATURES_KEY = "features:"


class FeaturesService(Service):
    """Compute per-token features from token events; store and publish them."""

    name: ClassVar[str] = "features"
    settings_class: ClassVar[type[FeaturesSettings]] = FeaturesSettings
    needs_store: ClassVar[bool] = True
    #: where a token without a record is rebuilt from: the feed's stored events
    needs_db: ClassVar[bool] = True
    #: needed for those rebuilds alone, which wait for it: every other token goes on
    optional_dependencies: ClassVar[frozenset[str]] = frozenset({POSTGRES})

    settings: FeaturesSettings

    def __init__(
        self,
        settings: FeaturesSettings,
        *,
        manager: FeatureManager | None = None,
        registry: CollectorRegistry | None = None,
    ):
        super().__init__(settings)
        self.manager = manager or FeatureManager()
        self.processor = FeaturesProcessor(
            self.manager, retire_ttl_s=settings.features_inactive_ttl_s
        )
        self.metrics = FeaturesMetrics(registry=registry)
        self.consumer_metrics = ConsumerMetrics(self.name, registry=registry)
        self.consumer: KeyedStatefulConsumer[TokenState] | None = None
        self.reader: FeatureCache | None = None
        self._ctx: ServiceContext | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self.consumer = ctx.keyed_consumer(
            self.processor,
            self.settings.consumer_config(self.name),
            views=self._views,
            priority_hint=lifecycle_priority,
            metrics=self.consumer_metrics,
            history=None if ctx.db is None else feed_history(ctx.db),
        )
        self.reader = FeatureCache(ctx.store, prefix=FEATURES_KEY, keep_reads=False)
        self.metrics.serving(self.manager.version, len(self.manager.names))
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    def _views(
        self, mint: str, state: TokenState, published: int, emitted: Sequence[Event]
    ) -> dict[str, Any]:
        if not state.n_events:
            return {}  # a lifecycle event for a token not traded here yet
        manager = self.manager
        # the values just announced are the state's (no second computation) unless trades
        # folded in after them went unannounced (the one meant to announce was refused)
        announced = emitted[-1].data if emitted else None
        if announced is not None and announced.source_seq == state.seq:
            values = announced.values
        else:
            values = tuple(manager.values(state))
        vector = FeatureVector(
            mint=mint,
            version=manager.version,
            seq=state.seq,
            time=state.last_time,
            names=manager.names,
            values=values,
            out_seq=published,
            updated_at=self._ctx.clock.now(),
        )
        return {FEATURES_KEY + mint: vector.fields()}

    async def status(self) -> dict[str, Any]:
        consumer = {} if self.consumer is None else self.consumer.describe()
        return {"feature_set_version": self.manager.version, **consumer}

    # ------------------------------------------------------------------ reads

    async def read_features(self, mint: str) -> dict[str, Any] | None:
        """The stored features of ``mint`` (any replica's) of this feature set, or None."""
        vector = await self.reader.get(mint, version=self.manager.version)
        if vector is None:
            return None
        return {
            "mint": mint,
            "version": vector.version,
            "seq": vector.seq,
            "out_seq": vector.out_seq,
            "time": vector.time,
            "updated_at": vector.updated_at,
            "features": vector.as_dict(),
        }

    def router(self):
        from fastapi import APIRouter, HTTPException

        router = APIRouter()

        @router.get("/features/{mint}")
        async def get_features(mint: str) -> dict[str, Any]:
            found = await self.read_features(mint)
            if found is None:
                raise HTTPException(
                    status_code=404,
                    detail=f"no features of version {self.manager.version} for {mint}",
                )
            return found

        return router


def lifecycle_priority(event: Event) -> int | None:
    """The priority a ``token.lifecycle`` event recommends for the token's queued work."""
    return event.data.priority if event.type == "token.lifecycle" else None
