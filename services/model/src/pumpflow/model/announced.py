"""Which features of each model the deployment announced drifting: in Postgres when the
run has a database, else in the state store.

Every replica runs a :class:`~pumpflow.common.model.drift.DriftMonitor` per model over
the vectors of its own partitions, and a monitor starts afresh with its process. A
transition a monitor reports goes out as ``model.drift`` only if it changes what the
deployment announced: "drifting" if no replica announced the feature drifting (an
atomic set-if-absent of its key or row), "recovered" if one did (an atomic delete of
it). So each crossing is announced once, by the first replica to see it, whichever
replicas see it after and however often they restart; a monitor made (a start, a model
loaded) takes the features announced drifting as drifting
(:meth:`DriftAnnouncements.drifting`) and reports their recovery. The state is stored
before the event that announces it is published: a replica that dies between the two
leaves that one crossing unannounced.

Postgres (:class:`PostgresDriftAnnouncements`, ``model_drift_announced``) keeps it
over a restart of the state store. In the state store alone (:class:`DriftAnnouncements`,
a run without a database) a store that lost its contents (Redis restarted without
persistence, a flush) forgets what was announced: the recovery of a drift announced
before is not announced (nothing is left to delete), and a monitor made after (a
restart, a load) announces a drift still there again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from pumpflow.common.events import ModelDrift
from pumpflow.common.state.abc import StateStore

KEY_PREFIX = "model:drift:"
DRIFTING = b"drifting"
#: a feature announced drifting and never recovered is forgotten after this long (a model
#: taken out of service): a monitor made after that (a restart, a load) announces it
#: again if it still drifts, and its recovery seen by a monitor made before is not
#: announced (nothing is left to delete)
TTL_S = 30 * 86_400.0

_encode_name = msgspec.json.Encoder().encode


def _key(model_id: str, feature: str) -> str:
    return KEY_PREFIX + _encode_name((model_id, feature)).decode()


class DriftAnnouncements:
    """The drift the deployment announced, per model and feature, in a state store."""

    def __init__(self, store: StateStore, *, ttl: float = TTL_S):
        self.store = store
        self.ttl = ttl

    async def claim(self, transition: ModelDrift) -> bool:
        """Whether ``transition`` is this replica's to announce (and now announced)."""
        key = _key(transition.model_id, transition.feature)
        if transition.state == "drifting":
            return await self.store.set_if_absent(key, DRIFTING, self.ttl)
        return await self.store.delete_if_equal(key, DRIFTING)

    async def drifting(self, model_id: str, features: Sequence[str]) -> list[str]:
        """The features of ``model_id`` announced drifting."""
        values = await self.store.get_many([_key(model_id, f) for f in features])
        return [f for f, value in zip(features, values, strict=True) if value == DRIFTING]


class PostgresDriftAnnouncements:
    """The drift the deployment announced, per model and feature, in Postgres: a row of
    ``model_drift_announced`` per feature announced drifting, none older than ``ttl``."""

    def __init__(self, pool: Any, *, ttl: float = TTL_S):
        self.pool = pool
        self.ttl = ttl

    async def claim(self, transition: ModelDrift) -> bool:
        """Whether ``transition`` is this replica's to announce (and now announced)."""
        if transition.state == "drifting":
            # a row past its TTL is no announcement: taken over as a new one
            claimed = await self.pool.fetchval(
                "INSERT INTO model_drift_announced (model_id, feature) VALUES ($1, $2) "
                "ON CONFLICT (model_id, feature) DO UPDATE SET announced_at = now() "
                "WHERE model_drift_announced.announced_at <= now() - make_interval(secs => $3) "
                "RETURNING true",
                transition.model_id,
                transition.feature,
                self.ttl,
            )
        else:
            claimed = await self.pool.fetchval(
                "DELETE FROM model_drift_announced WHERE model_id = $1 AND feature = $2 "
                "RETURNING announced_at > now() - make_interval(secs => $3)",
                transition.model_id,
                transition.feature,
                self.ttl,
            )
        return bool(claimed)

    async def drifting(self, model_id: str, features: Sequence[str]) -> list[str]:
        """The features of ``model_id`` announced drifting."""
        rows = await self.pool.fetch(
            "SELECT feature FROM model_drift_announced WHERE model_id = $1 "
            "AND feature = ANY($2::text[]) AND announced_at > now() - make_interval(secs => $3)",
            model_id,
            list(features),
            self.ttl,
        )
        found = {row["feature"] for row in rows}
        return [f for f in features if f in found]


__all__ = ["DriftAnnouncements", "PostgresDriftAnnouncements"]
