"""The model service's live labels and refits, stored.

Every live label the service resolves is stored with the vector it scored (in the live
feature set's order), the model and version that scored it, its arm, score, event time
and label definition; every automatic refit is stored with its outcome: one decided
(swapped or kept, :class:`StoredRefit`), or one that decided nothing (refused or failed,
:class:`UndecidedRefit`, the newest few per model). Labels outlive a restart (the rolling
figures start from the stored ones) and are what a refit fits on.
:class:`PostgresLabelStore` is a deployment's (migrations 0011, 0012 and 0025), shared by
the replicas; :class:`MemoryLabelStore` the embedded run's without a database.

A swapped-in refit is stored with its model (the ONNX bytes and the card's), found by
the model's content hash (:func:`model_hash`): a replica that lacks the file writes it
into its own registry from the store, wherever it runs. Without a database the model
is only in the registry of the process that fitted it.

A refit is made by one replica at a time (:meth:`LabelStore.refitting`): the store's
counts since the last stored refit decide when one is due, whichever replica stored
the labels. Before each refit, that replica deletes the model's labels no refit reads
(:meth:`LabelStore.prune`, older than the newest
:attr:`~pumpflow.common.model.refit.RefitPolicy.kept_rows`), so the store stays bounded.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import asyncpg
import msgspec
import numpy as np

from pumpflow.common.model.card import LabelDefinition, vector_row
from pumpflow.common.model.manager import LabelledRows
from pumpflow.common.model.performance import ResolvedLabel, task_of

_encode_definition = msgspec.json.Encoder().encode
_decode_definition = msgspec.json.Decoder(LabelDefinition).decode


def definition_key(definition: LabelDefinition) -> str:
    """The stored form of a label definition; rows of another one are not refit on."""
    return _encode_definition(definition).decode()


class StoredRefit(msgspec.Struct, frozen=True, kw_only=True):
    """An automatic refit decided, swapped or not."""

    model_id: str
    serving_version: str
    candidate_version: str
    swapped: bool
    #: the metric both versions were compared on over the held-out slice
    metric: str
    serving_score: float
    candidate_score: float
    held_out_rows: int
    #: rows the refit was given (fitted on and held out)
    rows: int
    #: the newest stored label the refit saw
    last_label_id: int
    at: float
    #: where the candidate chosen (better on the held-out slice) was written (None: not
    #: chosen); ``swapped`` says whether it was then made the serving
    path: str | None = None
    #: the chosen candidate's content hash (:func:`model_hash`; None: not chosen)
    sha256: str | None = None


class UndecidedRefit(msgspec.Struct, frozen=True, kw_only=True):
    """An automatic refit that decided nothing: refused for what its rows or models are
    (too few rows, one class, a score NaN, the serving model expired) or failed (an
    error, a dependency away); the serving model goes on. ``outcome`` and ``reason`` are
    words of :data:`pumpflow.model.outcomes.REFIT_REASONS`."""

    model_id: str
    serving_version: str
    outcome: str
    reason: str
    #: the refusal or error as told (its message)
    detail: str
    #: the stored labels it was given (None: refused before they were read)
    rows: int | None = None
    at: float


def model_hash(model: bytes) -> str:
    """A model's content hash: what a serving names a refitted model's file by."""
    return hashlib.sha256(model).hexdigest()


class LabelCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Stored labels of a model (its feature set and label definition)."""

    rows: int
    #: of them, stored after the given label id
    new: int


class LabelStore(Protocol):
    async def add(
        self, labels: Sequence[ResolvedLabel], *, feature_set_version: str, names: tuple[str, ...]
    ) -> list[ResolvedLabel]:
        """Store released labels (their vectors in ``names`` order); those that were new,
        in the order given.

        A label without a vector or without a value (dropped) is not stored; a label
        stored already (by its model, arm, mint and event time), or given twice, is new
        once."""

    async def counts(
        self,
        model_id: str,
        feature_set_version: str,
        definition: str,
        *,
        after_id: int,
        at_most: int | None = None,
    ) -> LabelCounts:
        """How many labels of the model are stored, and how many after ``after_id``; each
        count stops at ``at_most`` (None: counts them all)."""

    async def prune(
        self, model_id: str, feature_set_version: str, definition: str, *, keep: int
    ) -> int:
        """Delete the labels of the model older by event time than its newest ``keep``
        (those at the oldest kept time stay); how many were deleted."""

    async def recent(
        self, model_id: str, feature_set_version: str, definition: str, limit: int
    ) -> tuple[LabelledRows, int]:
        """The newest ``limit`` labels of the model (oldest first, features in the
        stored order), each vector once, and the newest label's id.

        A model on two arms (live on one, shadowing every token on another) labels the
        tokens of its live arm twice: the same vector, score and label, one row."""

    async def last_labels(self, limit: int) -> list[ResolvedLabel]:
        """The newest ``limit`` labels of every model and arm, oldest first (no vectors)."""

    async def last_refit(self, model_id: str) -> StoredRefit | None:
        """The model's newest stored refit."""

    async def record_refit(
        self, refit: StoredRefit, *, model: bytes | None = None, card: bytes | None = None
    ) -> None:
        """Store a refit decided, with the model swapped in (its bytes and encoded card)."""

    async def record_swap(self, refit: StoredRefit) -> bool:
        """Mark the stored ``refit`` (its model id, candidate and time) as swapped in; True
        when this call marked it (False: marked already, or not stored)."""

    async def model_file(self, sha256: str) -> tuple[bytes, bytes] | None:
        """The stored model (bytes, encoded card) of that content hash; None if absent."""

    async def record_undecided(self, refit: UndecidedRefit, *, keep: int) -> None:
        """Store a refit that decided nothing; the model's newest ``keep`` are kept."""

    async def last_undecided(self, model_id: str) -> UndecidedRefit | None:
        """The model's newest stored refit that decided nothing."""

    async def refit_history(
        self, model_id: str | None, limit: int
    ) -> tuple[list[StoredRefit], list[UndecidedRefit]]:
        """The newest ``limit`` refits decided and the newest ``limit`` that decided
        nothing, of ``model_id`` (None: of every model), each list newest first."""

    def refitting(self, model_id: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Hold the right to refit ``model_id`` (True) unless another replica holds it."""


def _label_rows(
    labels: Sequence[ResolvedLabel], feature_set_version: str, names: tuple[str, ...]
) -> tuple[list[tuple], list[ResolvedLabel]]:
    """The rows to store of ``labels``, and the labels they are, alike in order."""
    rows = []
    kept = []
    # labels released together share their definitions and their feature names' tuple:
    # each encoded, each compared with the store's, once
    keys: dict[int, str] = {}
    last_names: tuple[str, ...] | None = None
    in_order = False
    for label in labels:
        values = label.vector()
        if not len(values) or math.isnan(label.label):
            continue
        if label.feature_names is not last_names:
            last_names = label.feature_names
            in_order = tuple(last_names) == tuple(names)
        features = values if in_order else vector_row(label.feature_names, values, names)
        definition = label.definition
        key = keys.get(id(definition))
        if key is None:
            key = keys[id(definition)] = definition_key(definition)
        rows.append(
            (
                label.model_id,
                label.version,
                label.arm,
                label.mint,
                label.time,
                label.score,
                label.label,
                key,
                feature_set_version,
                features.tolist(),
                label.resolved_at,
            )
        )
        kept.append(label)
    return rows, kept


def _natural_key(row: tuple) -> tuple:
    """A stored row's key (model, arm, mint, event time): stored once."""
    return row[0], row[2], row[3], row[4]


def _labelled(records: list[tuple[int, str, float, float, Sequence[float]]]) -> LabelledRows:
    """(id, mint, time, label, features) rows, newest first, as LabelledRows oldest first."""
    records = records[::-1]
    tokens: dict[str, int] = {}
    return LabelledRows(
        rows=np.array([r[4] for r in records], dtype=np.float64).reshape(len(records), -1),
        labels=np.array([r[3] for r in records], dtype=np.float64),
        time=np.array([r[2] for r in records], dtype=np.float64),
        token=np.array([tokens.setdefault(r[1], len(tokens)) for r in records], np.int64),
        source="stored live labels",
    )


_LABEL_COLUMNS = (
    "model_id",
    "model_version",
    "arm",
    "mint",
    "event_time",
    "score",
    "label",
    "definition",
    "feature_set_version",
    "features",
    "resolved_at",
)
_CREATE_STAGE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS model_labels_stage (model_id text, "
    "model_version text, arm text, mint text, event_time double precision, "
    "score double precision, label double precision, definition text, "
    "feature_set_version text, features double precision[], "
    "resolved_at double precision) ON COMMIT DELETE ROWS"
)
_REFIT_COLUMNS = (
    "model_id, serving_version, candidate_version, swapped, metric, serving_score, "
    "candidate_score, held_out_rows, rows, last_label_id, at, path, sha256"
)
_OF_MODEL = "model_id = $1 AND feature_set_version = $2 AND definition = $3"
_UNDECIDED_COLUMNS = "model_id, serving_version, outcome, reason, detail, rows, at"


class PostgresLabelStore:
    """Labels, refits and the refitted models in Postgres (migrations 0011, 0012, 0025)."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def add(
        self, labels: Sequence[ResolvedLabel], *, feature_set_version: str, names: tuple[str, ...]
    ) -> list[ResolvedLabel]:
        rows, kept = _label_rows(labels, feature_set_version, names)
        if not rows:
            return []
        async with self.pool.acquire() as conn, conn.transaction():
            # a label stored already (a delivery repeated after a rebalance) is kept once
            await conn.execute(_CREATE_STAGE)
            await conn.copy_records_to_table(
                "model_labels_stage", records=rows, columns=_LABEL_COLUMNS
            )
            columns = ", ".join(_LABEL_COLUMNS)
            inserted = await conn.fetch(
                f"INSERT INTO model_labels ({columns}) SELECT {columns} "
                "FROM model_labels_stage ORDER BY event_time ON CONFLICT DO NOTHING "
                "RETURNING model_id, arm, mint, event_time"
            )
        if len(inserted) == len(rows):
            return kept
        new = {tuple(record) for record in inserted}
        added = []
        for row, label in zip(rows, kept, strict=True):
            key = _natural_key(row)
            if key in new:
                new.discard(key)  # a label given twice is new once
                added.append(label)
        return added

    async def counts(
        self,
        model_id: str,
        feature_set_version: str,
        definition: str,
        *,
        after_id: int,
        at_most: int | None = None,
    ) -> LabelCounts:
        # each a range of model_labels_counted (migration 0020), read up to the cap (LIMIT
        # NULL: all) from the index alone
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM (SELECT FROM model_labels "
            f"WHERE {_OF_MODEL} LIMIT $5) AS stored) AS rows, "
            "(SELECT count(*) FROM (SELECT FROM model_labels "
            f"WHERE {_OF_MODEL} AND id > $4 LIMIT $5) AS since) AS new",
            model_id,
            feature_set_version,
            definition,
            after_id,
            at_most,
        )
        return LabelCounts(rows=row["rows"], new=row["new"])

    async def prune(
        self, model_id: str, feature_set_version: str, definition: str, *, keep: int
    ) -> int:
        # one statement: replicas pruning at once delete the same rows, each once
        status = await self.pool.execute(
            f"DELETE FROM model_labels WHERE {_OF_MODEL} AND event_time < ("
            f"SELECT event_time FROM model_labels WHERE {_OF_MODEL} "
            "ORDER BY event_time DESC OFFSET $4 LIMIT 1)",
            model_id,
            feature_set_version,
            definition,
            keep - 1,
        )
        return int(status.split()[-1])

    async def recent(
        self, model_id: str, feature_set_version: str, definition: str, limit: int
    ) -> tuple[LabelledRows, int]:
        records = await self.pool.fetch(
            f"SELECT DISTINCT ON (event_time, mint) id, mint, event_time, label, features "
            f"FROM model_labels WHERE {_OF_MODEL} ORDER BY event_time DESC, mint, id DESC "
            "LIMIT $4",
            model_id,
            feature_set_version,
            definition,
            limit,
        )
        last_id = max((r["id"] for r in records), default=0)
        return _labelled([tuple(r.values()) for r in records]), last_id

    async def last_labels(self, limit: int) -> list[ResolvedLabel]:
        records = await self.pool.fetch(
            "SELECT mint, model_id, model_version, arm, event_time, score, label, "
            "definition, resolved_at FROM model_labels ORDER BY id DESC LIMIT $1",
            limit,
        )
        return [_resolved(*r.values()) for r in reversed(records)]

    async def last_refit(self, model_id: str) -> StoredRefit | None:
        row = await self.pool.fetchrow(
            f"SELECT {_REFIT_COLUMNS} FROM model_refits WHERE model_id = $1 "
            "ORDER BY id DESC LIMIT 1",
            model_id,
        )
        return None if row is None else StoredRefit(**dict(row))

    async def record_refit(
        self, refit: StoredRefit, *, model: bytes | None = None, card: bytes | None = None
    ) -> None:
        await self.pool.execute(
            f"INSERT INTO model_refits ({_REFIT_COLUMNS}, model, card) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            *msgspec.structs.astuple(refit),
            model,
            card,
        )

    async def record_swap(self, refit: StoredRefit) -> bool:
        status = await self.pool.execute(
            "UPDATE model_refits SET swapped = true "
            "WHERE model_id = $1 AND candidate_version = $2 AND at = $3 AND NOT swapped",
            refit.model_id,
            refit.candidate_version,
            refit.at,
        )
        return status != "UPDATE 0"

    async def model_file(self, sha256: str) -> tuple[bytes, bytes] | None:
        row = await self.pool.fetchrow(
            "SELECT model, card FROM model_refits "
            "WHERE sha256 = $1 AND model IS NOT NULL AND card IS NOT NULL LIMIT 1",
            sha256,
        )
        return None if row is None else (row["model"], row["card"])

    async def record_undecided(self, refit: UndecidedRefit, *, keep: int) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO model_refits_undecided ({_UNDECIDED_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *msgspec.structs.astuple(refit),
            )
            # a model refused for days adds one a refit interval: the newest few say why
            await conn.execute(
                "DELETE FROM model_refits_undecided WHERE model_id = $1 AND id < ("
                "SELECT min(id) FROM (SELECT id FROM model_refits_undecided "
                "WHERE model_id = $1 ORDER BY id DESC LIMIT $2) AS kept)",
                refit.model_id,
                keep,
            )

    async def last_undecided(self, model_id: str) -> UndecidedRefit | None:
        row = await self.pool.fetchrow(
            f"SELECT {_UNDECIDED_COLUMNS} FROM model_refits_undecided WHERE model_id = $1 "
            "ORDER BY id DESC LIMIT 1",
            model_id,
        )
        return None if row is None else UndecidedRefit(**dict(row))

    async def refit_history(
        self, model_id: str | None, limit: int
    ) -> tuple[list[StoredRefit], list[UndecidedRefit]]:
        of_model = "WHERE $1::text IS NULL OR model_id = $1 ORDER BY at DESC, id DESC LIMIT $2"
        decided = await self.pool.fetch(
            f"SELECT {_REFIT_COLUMNS} FROM model_refits {of_model}", model_id, limit
        )
        undecided = await self.pool.fetch(
            f"SELECT {_UNDECIDED_COLUMNS} FROM model_refits_undecided {of_model}", model_id, limit
        )
        return (
            [StoredRefit(**dict(row)) for row in decided],
            [UndecidedRefit(**dict(row)) for row in undecided],
        )

    @contextlib.asynccontextmanager
    async def refitting(self, model_id: str) -> AsyncIterator[bool]:
        # a session lock on a connection held for the refit: released if this dies
        async with self.pool.acquire() as conn:
            key = f"model-refit:{model_id}"
            held = await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext(current_schema() || ':' || $1))", key
            )
            try:
                yield held
            finally:
                if held:
                    await conn.execute(
                        "SELECT pg_advisory_unlock(hashtext(current_schema() || ':' || $1))",
                        key,
                    )


def _resolved(
    mint, model_id, version, arm, time, score, label, definition, resolved_at
) -> ResolvedLabel:
    decoded = _decode_definition(definition)
    return ResolvedLabel(
        mint=mint,
        model_id=model_id,
        version=version,
        arm=arm,
        task=task_of(decoded),
        score=score,
        time=time,
        entry_price=math.nan,
        label=label,
        definition=decoded,
        resolved_at=resolved_at,
    )


class MemoryLabelStore:
    """Labels and refits in memory (an embedded run without a database): the newest
    ``kept`` labels."""

    def __init__(self, *, kept: int = 400_000):
        self.kept = kept
        #: (id, row as stored)
        self.labels: list[tuple[int, tuple]] = []
        self.refits: list[StoredRefit] = []
        self.undecided: list[UndecidedRefit] = []
        self._next_id = 1
        self._keys: set[tuple] = set()
        #: the ids kept of each model, feature set and definition, ascending (counts are
        #: asked every few seconds: a bisection, not a pass over every label)
        self._ids: dict[tuple[str, str, str], list[int]] = {}

    async def add(
        self, labels: Sequence[ResolvedLabel], *, feature_set_version: str, names: tuple[str, ...]
    ) -> list[ResolvedLabel]:
        added = []
        rows, kept = _label_rows(labels, feature_set_version, names)
        for row, label in zip(rows, kept, strict=True):
            key = _natural_key(row)
            if key in self._keys:
                continue
            self._keys.add(key)
            self.labels.append((self._next_id, row))
            self._ids.setdefault((row[0], row[8], row[7]), []).append(self._next_id)
            self._next_id += 1
            added.append(label)
        if len(self.labels) > self.kept:
            dropped: dict[tuple[str, str, str], int] = {}
            for _, row in self.labels[: len(self.labels) - self.kept]:
                self._keys.discard(_natural_key(row))
                of_model = (row[0], row[8], row[7])
                dropped[of_model] = dropped.get(of_model, 0) + 1
            del self.labels[: len(self.labels) - self.kept]
            for of_model, count in dropped.items():
                del self._ids[of_model][:count]  # the oldest of each are the ones dropped
        return added

    def _of(self, model_id: str, feature_set_version: str, definition: str):
        return [
            (label_id, row)
            for label_id, row in self.labels
            if row[0] == model_id and row[8] == feature_set_version and row[7] == definition
        ]

    async def counts(
        self,
        model_id: str,
        feature_set_version: str,
        definition: str,
        *,
        after_id: int,
        at_most: int | None = None,
    ) -> LabelCounts:
        ids = self._ids.get((model_id, feature_set_version, definition), [])
        rows, new = len(ids), len(ids) - bisect.bisect_right(ids, after_id)
        if at_most is not None:
            rows, new = min(rows, at_most), min(new, at_most)
        return LabelCounts(rows=rows, new=new)

    async def prune(
        self, model_id: str, feature_set_version: str, definition: str, *, keep: int
    ) -> int:
        of_model = (model_id, feature_set_version, definition)
        times = sorted((row[4] for _, row in self._of(*of_model)), reverse=True)
        if len(times) <= keep:
            return 0
        oldest_kept = times[keep - 1]
        kept = []
        for label_id, row in self.labels:
            if (row[0], row[8], row[7]) == of_model and row[4] < oldest_kept:
                self._keys.discard(_natural_key(row))
            else:
                kept.append((label_id, row))
        deleted = len(self.labels) - len(kept)
        self.labels = kept
        self._ids[of_model] = [i for i, row in kept if (row[0], row[8], row[7]) == of_model]
        return deleted

    async def recent(
        self, model_id: str, feature_set_version: str, definition: str, limit: int
    ) -> tuple[LabelledRows, int]:
        newest = sorted(
            self._of(model_id, feature_set_version, definition),
            key=lambda item: (item[1][4], item[0]),
            reverse=True,
        )
        seen: set[tuple[float, str]] = set()
        mine = []
        for item in newest:
            if len(mine) == limit:
                break
            vector = (item[1][4], item[1][3])
            if vector not in seen:
                seen.add(vector)
                mine.append(item)
        last_id = max((i for i, _ in mine), default=0)
        return _labelled([(i, r[3], r[4], r[6], r[9]) for i, r in mine]), last_id

    async def last_labels(self, limit: int) -> list[ResolvedLabel]:
        return [
            _resolved(r[3], r[0], r[1], r[2], r[4], r[5], r[6], r[7], r[10])
            for _, r in self.labels[-limit:]
        ]

    async def last_refit(self, model_id: str) -> StoredRefit | None:
        mine = [r for r in self.refits if r.model_id == model_id]
        return mine[-1] if mine else None

    async def record_refit(
        self, refit: StoredRefit, *, model: bytes | None = None, card: bytes | None = None
    ) -> None:
        # the model stays in the registry of the process that fitted it, the only one
        self.refits.append(refit)

    async def record_swap(self, refit: StoredRefit) -> bool:
        marked = False
        for i, stored in enumerate(self.refits):
            if not stored.swapped and (stored.model_id, stored.candidate_version, stored.at) == (
                refit.model_id,
                refit.candidate_version,
                refit.at,
            ):
                self.refits[i] = msgspec.structs.replace(stored, swapped=True)
                marked = True
        return marked

    async def model_file(self, sha256: str) -> tuple[bytes, bytes] | None:
        return None

    async def record_undecided(self, refit: UndecidedRefit, *, keep: int) -> None:
        self.undecided.append(refit)
        mine = [i for i, r in enumerate(self.undecided) if r.model_id == refit.model_id]
        dropped = set(mine[:-keep])
        self.undecided = [r for i, r in enumerate(self.undecided) if i not in dropped]

    async def last_undecided(self, model_id: str) -> UndecidedRefit | None:
        mine = [r for r in self.undecided if r.model_id == model_id]
        return mine[-1] if mine else None

    async def refit_history(
        self, model_id: str | None, limit: int
    ) -> tuple[list[StoredRefit], list[UndecidedRefit]]:
        def newest(refits):
            # stored in order: the newest last, and ties by time kept in that order
            mine = [r for r in reversed(refits) if model_id is None or r.model_id == model_id]
            return sorted(mine, key=lambda r: r.at, reverse=True)[:limit]

        return newest(self.refits), newest(self.undecided)

    @contextlib.asynccontextmanager
    async def refitting(self, model_id: str) -> AsyncIterator[bool]:
        yield True


__all__ = [
    "LabelCounts",
    "LabelStore",
    "MemoryLabelStore",
    "PostgresLabelStore",
    "StoredRefit",
    "UndecidedRefit",
    "definition_key",
    "model_hash",
]
