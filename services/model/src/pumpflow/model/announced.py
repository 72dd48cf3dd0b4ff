"""Which features of each model the deployment announced drifting, in the state store.

Every replica runs a :class:`~pumpflow.common.model.drift.DriftMonitor` per model over
the vectors of its own partitions, and a monitor starts afresh with its process. A
transition a monitor reports goes out as ``model.drift`` only if it changes what the
deployment announced: "drifting" if no replica announced the feature drifting (an
atomic set-if-absent of its key), "recovered" if one did (an atomic delete of it). So
each crossing is announced once, by the first replica to see it, whichever replicas
see it after and however often they restart; a monitor made (a start, a model loaded)
takes the features announced drifting as drifting (:meth:`DriftAnnouncements.drifting`)
and reports their recovery. The state is stored before the event that announces it is
published: a replica that dies between the two leaves that one crossing unannounced.
"""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = ["DriftAnnouncements"]
