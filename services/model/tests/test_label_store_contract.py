"""One contract for every LabelStore: in memory (an embedded run) and Postgres (a
deployment's, shared by the replicas)."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest
from model_helpers import DEFAULT_CARD, START

from pumpflow.common.features import FeatureManager
from pumpflow.common.model.performance import ResolvedLabel
from pumpflow.model.labels import (
    LabelStore,
    MemoryLabelStore,
    PostgresLabelStore,
    definition_key,
)

NAMES = FeatureManager().names
FEATURE_SET = DEFAULT_CARD.feature_set_version
ENTRY = ("entry", FEATURE_SET, definition_key(DEFAULT_CARD.label))


@pytest.fixture(params=["memory", "postgres"])
def replicas(request) -> tuple[LabelStore, LabelStore]:
    """Two replicas' stores of one deployment's labels."""
    if request.param == "memory":
        store = MemoryLabelStore()
        return store, store
    pool = request.getfixturevalue("pg_pool")
    return PostgresLabelStore(pool), PostgresLabelStore(pool)


def labels(n: int, *, model_id: str = "entry", start: float = START) -> list[ResolvedLabel]:
    """``n`` labels of ``model_id`` a second apart from ``start``, 20 per token."""
    rows = np.random.default_rng(4).normal(size=(n, len(NAMES)))
    return [
        ResolvedLabel(
            mint=f"token{i // 20}",
            model_id=model_id,
            version=DEFAULT_CARD.version,
            arm="control",
            task="classification",
            score=0.5,
            time=start + i,
            entry_price=1.0,
            label=float(rows[i, 0] > 0),
            definition=DEFAULT_CARD.label,
            resolved_at=start + i + 122.0,
            feature_names=NAMES,
            features=tuple(float(v) for v in rows[i]),
        )
        for i in range(n)
    ]


async def add(store: LabelStore, given: list[ResolvedLabel]) -> list[ResolvedLabel]:
    return await store.add(given, feature_set_version=FEATURE_SET, names=NAMES)


async def times(store: LabelStore, of_model=ENTRY) -> list[float]:
    rows, _ = await store.recent(*of_model, 1_000_000)
    return rows.time.tolist()


async def test_labels_older_than_the_newest_kept_are_pruned_the_newest_intact(replicas):
    store, _ = replicas
    given = labels(300)
    # stored out of event-time order (labels resolve late): pruned by event time
    await add(store, given[:200:2])
    await add(store, given[1:200:2])
    _, before_the_last = await store.recent(*ENTRY, 1)
    await add(store, given[200:])
    other = labels(50, model_id="exit", start=START - 10_000.0)
    await add(store, other)
    newest, _ = await store.recent(*ENTRY, 100)

    assert await store.prune(*ENTRY, keep=100) == 200
    assert await times(store) == [label.time for label in given[200:]]
    kept, _ = await store.recent(*ENTRY, 100)
    np.testing.assert_array_equal(kept.rows, newest.rows)
    np.testing.assert_array_equal(kept.labels, newest.labels)
    counts = await store.counts(*ENTRY, after_id=before_the_last)
    assert (counts.rows, counts.new) == (100, 100)
    # another model's labels, older than every one kept, are its own to prune
    exit_model = ("exit", *ENTRY[1:])
    assert len(await times(store, exit_model)) == 50
    # pruning again deletes nothing; a label stored after is new, one pruned is new again
    assert await store.prune(*ENTRY, keep=100) == 0
    assert await add(store, [given[0], given[299]]) == [given[0]]
    counts = await store.counts(*ENTRY, after_id=before_the_last)
    assert (counts.rows, counts.new) == (101, 101)
    assert await store.prune(*ENTRY, keep=100) == 1
    assert await store.prune(*ENTRY, keep=1_000) == 0
    assert await times(store) == [label.time for label in given[200:]]


async def test_labels_at_the_oldest_kept_time_are_all_kept(replicas):
    store, _ = replicas
    given = labels(10)
    # the same event time on two arms: two rows of one vector
    await add(store, [*given, *(msgspec.structs.replace(x, arm="shadow") for x in given[:4])])
    assert await store.prune(*ENTRY, keep=7) == 6
    assert (await store.counts(*ENTRY, after_id=0)).rows == 8
    assert await times(store) == [label.time for label in given[3:]]


async def test_counts_stop_at_the_cap_asked(replicas):
    store, _ = replicas
    await add(store, labels(120))
    _, last_id = await store.recent(*ENTRY, 1)
    for at_most, expected in ((None, (120, 0)), (50, (50, 0)), (500, (120, 0))):
        counts = await store.counts(*ENTRY, after_id=last_id, at_most=at_most)
        assert (counts.rows, counts.new) == expected
    counts = await store.counts(*ENTRY, after_id=0, at_most=50)
    assert (counts.rows, counts.new) == (50, 50)


async def test_two_replicas_pruning_at_once_delete_each_label_once(replicas):
    given = labels(3_000)
    await add(replicas[0], given)
    deleted = await asyncio.gather(*(store.prune(*ENTRY, keep=1_000) for store in replicas))
    assert sum(deleted) == 2_000
    for store in replicas:
        assert await times(store) == [label.time for label in given[2_000:]]
        counts = await store.counts(*ENTRY, after_id=0)
        assert (counts.rows, counts.new) == (1_000, 1_000)
