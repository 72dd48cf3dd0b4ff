"""A model's old refits pruned from the store, the newest and the served ones kept.

Every refit decided is stored (``model_refits``), a swapped-in one with its model's bytes
and card, and written to the registry of the replica that fitted it. After each refit,
the replica that made it, still holding the model's refit lock, deletes the refits
:meth:`~pumpflow.common.model.refit.RefitPolicy.prunable` names (all but the newest
``keep_refits`` of the model, never one whose model a serving names) and then removes
the pruned models' files from its own registry. The other replicas' registries keep the
copies they wrote from the store until their disk is renewed.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import asyncpg
import msgspec

from pumpflow.common.model.refit import RefitPolicy
from pumpflow.model.labels import LabelStore, MemoryLabelStore, PostgresLabelStore


class PrunedRefit(msgspec.Struct, frozen=True, kw_only=True):
    """A refit deleted from the store."""

    model_id: str
    candidate_version: str
    #: its model's content hash (None: it was not swapped in, no model was stored)
    sha256: str | None = None


class RefitPruner(Protocol):
    async def prune(
        self, model_id: str, policy: RefitPolicy, served: Collection[str]
    ) -> list[PrunedRefit]:
        """Delete the refits of ``model_id`` the policy prunes (``served``: the content
        hashes of the models a serving names); the refits deleted."""


class PostgresRefitPruner:
    """Prunes ``model_refits`` (migrations 0011, 0012)."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def prune(
        self, model_id: str, policy: RefitPolicy, served: Collection[str]
    ) -> list[PrunedRefit]:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, sha256 FROM model_refits WHERE model_id = $1 ORDER BY id DESC",
                model_id,
            )
            ids = [rows[i]["id"] for i in policy.prunable([r["sha256"] for r in rows], served)]
            if not ids:
                return []
            deleted = await conn.fetch(
                "DELETE FROM model_refits WHERE id = ANY($1::bigint[]) "
                "RETURNING model_id, candidate_version, sha256",
                ids,
            )
        return [PrunedRefit(**dict(row)) for row in deleted]


class MemoryRefitPruner:
    """Prunes a :class:`~pumpflow.model.labels.MemoryLabelStore`'s refits."""

    def __init__(self, store: MemoryLabelStore):
        self.store = store

    async def prune(
        self, model_id: str, policy: RefitPolicy, served: Collection[str]
    ) -> list[PrunedRefit]:
        refits = self.store.refits
        mine = [i for i in range(len(refits) - 1, -1, -1) if refits[i].model_id == model_id]
        dropped = {mine[i] for i in policy.prunable([refits[j].sha256 for j in mine], served)}
        self.store.refits = [r for i, r in enumerate(refits) if i not in dropped]
        return [
            PrunedRefit(model_id=r.model_id, candidate_version=r.candidate_version, sha256=r.sha256)
            for i, r in enumerate(refits)
            if i in dropped
        ]


def refit_pruner(store: LabelStore) -> RefitPruner | None:
    """The pruner of ``store``'s refits; None for a store of another kind."""
    if isinstance(store, PostgresLabelStore):
        return PostgresRefitPruner(store.pool)
    if isinstance(store, MemoryLabelStore):
        return MemoryRefitPruner(store)
    return None


__all__ = [
    "MemoryRefitPruner",
    "PostgresRefitPruner",
    "PrunedRefit",
    "RefitPruner",
    "refit_pruner",
]
