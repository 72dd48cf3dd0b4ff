"""Live labels stored in Postgres and used: they outlive a restart, and the service refits
its model on them when the policy says so, swapping the refit in only if it is better."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest
from model_helpers import DEFAULT_CARD, NAMES, START, synthetic_labels, vector_event
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import FeatureManager
from pumpflow.common.model import ModelManager
from pumpflow.common.model.refit import RefitPolicy
from pumpflow.common.model.registry import card_path
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import (
    BusHarness,
    EventCollector,
    FeatureUpdates,
    LosingStore,
    eventually,
)
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.labels import (
    MemoryLabelStore,
    PostgresLabelStore,
    definition_key,
    model_hash,
)
from pumpflow.model.service import SERVING_KEY, ModelService, ModelSettings, ModelSource
from pumpflow.model.training import LightGBMRefitter, TrainConfig
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

#: rows the refit tests store, and the policy's thresholds for them
ROWS = 4_000


def model_service(**settings) -> ModelService:
    return ModelService(
        ModelSettings.load(service="model", transport="memory", **settings),
        registry=CollectorRegistry(),
        refitter=LightGBMRefitter(config=TrainConfig(n_estimators=30)),
    )


async def stored_labels(pool) -> list:
    return await pool.fetch(
        "SELECT mint, event_time, model_version, arm, score, label, features "
        "FROM model_labels ORDER BY id"
    )


def seed5_vectors(seconds: float) -> list:
    """The vectors of ``seconds`` of simulated market (seed 5) from START."""
    return FeatureUpdates().of(
        market_events(Market(MarketConfig(seed=5)), seconds, start_epoch=START, source="feed/sim")
    )


async def feed(system, clock: ReplayClock, vectors: list) -> None:
    """Publish ``vectors`` each at its time, then let the system take them all."""
    for vector in vectors:
        await clock.advance_to(vector.time)
        await system.bus.publish(vector)
    await system.drain()


async def test_live_labels_are_stored_with_the_vector_scored_and_outlive_a_restart(pg_pool):
    clock = ReplayClock(START)
    vectors = seed5_vectors(240.0)
    settings = {"model_monitor_s": 0.05, "model_refit": False}
    first = model_service(**settings)
    async with run_embedded([first], clock=clock, db=pg_pool) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.prediction")
        await feed(system, clock, vectors)
        # past every horizon and its grace: every label followed is released and stored
        await clock.advance_to(vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0)
        await eventually(lambda: first.labels.pending == 0, what="every label released")
        figures = first.performance.figures("entry", "control")

        async def all_stored() -> bool:
            count = await pg_pool.fetchval("SELECT count(*) FROM model_labels")
            return count == figures.labels

        await eventually(all_stored, what="every label released stored")
    rows = await stored_labels(pg_pool)
    assert len(rows) == figures.labels > 50
    # each is a prediction that was published, with the vector it scored
    predictions = {(p.key, p.time): p for p in seen.of("model.prediction")}
    scored = {v.id: v for v in vectors}
    for row in rows:
        prediction = predictions[(row["mint"], row["event_time"])]
        assert (row["model_version"], row["arm"]) == (DEFAULT_CARD.version, "control")
        assert row["score"] == prediction.data.score
        assert row["label"] in (0.0, 1.0)
        vector = scored[prediction.causation_id].data
        assert vector.names == NAMES
        np.testing.assert_array_equal(row["features"], vector.values)

    # a new process on the same database: the rolling figures go on from the stored labels
    second = model_service(**settings)
    async with run_embedded([second], clock=ReplayClock(clock.now()), db=pg_pool):
        assert second.performance.figures("entry", "control") == figures


def labels_released(model: ModelService) -> bool:
    """Whether no token held by ``model`` has labels waiting."""
    states = map(model.consumer.state, list(model.consumer.keys()))
    return all(state is None or state.labels is None for state in states)


async def test_labels_released_are_stored_with_their_tokens_without_a_round(pg_pool):
    clock = ReplayClock(START)
    vectors = seed5_vectors(60.0)
    # no round of the monitor: the commits of the tokens store what they released
    model = model_service(model_monitor_s=3600.0, model_refit=False)
    async with run_embedded([model], clock=clock, db=pg_pool) as system:
        await feed(system, clock, vectors)
        followed = model.labels.pending
        assert followed > 10
        await clock.advance_to(vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0)
        await eventually(lambda: labels_released(model), what="every label released")
        await model.consumer.flush()
        # the tokens are stored without them: they were stored first
        assert model.labels.pending == 0
        assert len(await stored_labels(pg_pool)) == followed
        assert model.performance.figures("entry", "control").labels == followed
    assert len(await stored_labels(pg_pool)) == followed


async def test_a_label_the_store_refuses_alone_is_dropped_and_holds_no_commit(pg_pool):
    """A released label Postgres refuses for what it holds (a NUL in a text), stored with
    the others by a commit's ``before_write``: retried, it would hold that commit and
    every later one for ever. It is dropped and counted; the others are stored."""
    clock = ReplayClock(START)
    vectors = seed5_vectors(60.0)
    model = model_service(model_monitor_s=3600.0, model_refit=False)
    async with run_embedded([model], clock=clock, db=pg_pool) as system:
        await feed(system, clock, vectors)
        followed = model.labels.pending
        assert followed > 10
        good, poison = synthetic_labels(by_rsi, n=2)
        poison = msgspec.structs.replace(poison, mint="bad\x00mint")
        model._to_store += [good, poison]
        try:
            assert await model.store_labels() == 1
        finally:
            # a test that fails here stops all the same
            model._to_store = [label for label in model._to_store if label is not poison]
        assert model.metrics.refused_count() == 1
        # the rolling figures count the label stored, not the one dropped
        assert model.performance.figures("entry", "control").labels == 1
        await clock.advance_to(vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0)
        await eventually(lambda: labels_released(model), what="every label released")
        await asyncio.wait_for(model.consumer.flush(), 20.0)
        assert len(await stored_labels(pg_pool)) == followed + 1
        assert model._to_store == []


async def test_labels_released_and_committed_outlive_a_crash_before_the_round(pg_pool, namespace):
    clock = ReplayClock(START)
    vectors = seed5_vectors(60.0)
    buses = BusHarness("memory", namespace=namespace, partitions=4)
    store = MemoryStateStore(clock)

    async def replica() -> ModelService:
        # no round of the monitor comes before the crash
        model = model_service(model_monitor_s=3600.0, model_refit=False, partitions=4)
        settings = model.settings
        await model.start(
            ServiceContext(
                settings=settings,
                bus=await buses.bus("model"),
                clock=clock,
                store=store,
                db=pg_pool,
            )
        )
        return model

    try:
        first = await replica()
        publisher = await buses.bus("features/test")
        await clock.advance_to(vectors[-1].time)
        await publisher.publish_many(vectors)

        def all_applied() -> bool:
            counts = first.consumer_metrics.counts()
            return counts["applied"] + counts["duplicates"] >= len(vectors)

        await eventually(all_applied, what="every vector applied")
        await first.consumer.flush()
        followed = first.labels.pending
        assert followed > 10
        # past every horizon: the tokens' timers release the labels, and their states
        # are stored without them
        await clock.advance_to(vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0)
        await eventually(lambda: labels_released(first), what="every label released")
        await first.consumer.flush()
        # kill -9: no stop, nothing more stored or published
        for loop in first._loops:
            loop.cancel()
        bus = await buses.bus("model")
        await bus.abandon(first.consumer.subscription)
        await first.consumer.abandon()

        # neither lost nor counted twice: in the store once, the rolling figures of a
        # new process start from them, and no token holds them to release again
        assert len(await stored_labels(pg_pool)) == followed
        second = await replica()
        assert second.performance.figures("entry", "control").labels == followed
        await clock.advance(DEFAULT_CARD.label.horizon_s)
        await second.consumer.flush()
        assert labels_released(second)
        assert second.resolve_labels() == 0
        await second.stop()
        assert len(await stored_labels(pg_pool)) == followed
    finally:
        await buses.teardown()


def default_model_scores(rows: np.ndarray) -> np.ndarray:
    manager = ModelManager(None, FeatureManager(), clock=ReplayClock(START))
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    return manager.predict_batch("entry", rows)


def by_rsi(rows: np.ndarray) -> np.ndarray:
    """Labels the default model knows nothing of: a refit learns them."""
    return (rows[:, NAMES.index("rsi_14")] > 0.0) * 1.0


def by_the_default_model(rows: np.ndarray) -> np.ndarray:
    """Labels the default model ranks perfectly: no refit can do strictly better."""
    scores = default_model_scores(rows)
    return (scores > np.median(scores)) * 1.0


REFIT_SETTINGS = {
    "model_monitor_s": 0.05,
    "model_refit_every_labels": ROWS,
    "model_refit_min_rows": ROWS // 2,
    "model_refit_min_interval_s": 0.0,
    "model_refit_check_s": 0.05,
}


@pytest.mark.parametrize(
    ("labels_of", "min_gain", "better"),
    [
        (by_rsi, 0.01, True),
        (by_the_default_model, 0.01, False),
        # the refit learns the labels (AUC from about 0.5 to near 1), not by 0.75 more
        (by_rsi, 0.75, False),
    ],
)
async def test_the_service_refits_on_stored_labels_when_due_and_swaps_only_if_better(
    pg_pool, tmp_path, labels_of, min_gain, better
):
    store = PostgresLabelStore(pg_pool)
    labels = synthetic_labels(labels_of)
    # one label short of the policy's count: no refit is due
    await store.add(labels[:-1], feature_set_version=DEFAULT_CARD.feature_set_version, names=NAMES)
    clock = ReplayClock(START)
    model = model_service(
        model_registry_dir=str(tmp_path), model_refit_min_gain=min_gain, **REFIT_SETTINGS
    )
    async with run_embedded([model], clock=clock, db=pg_pool) as system:
        assert await model.refit_if_due("entry") is None
        assert await store.last_refit("entry") is None
        # the last label makes it due: the service's own loop refits
        await store.add(
            labels[-1:], feature_set_version=DEFAULT_CARD.feature_set_version, names=NAMES
        )
        await eventually(lambda: model.refits, within=120.0, what="an automatic refit")
        (refit,) = model.refits
        assert await store.last_refit("entry") == refit
        assert refit.rows == ROWS and refit.held_out_rows == int(ROWS * 0.3)
        assert refit.serving_version == DEFAULT_CARD.version != refit.candidate_version
        assert refit.swapped is better
        assert (refit.candidate_score - refit.serving_score > min_gain) is better
        assert refit.candidate_score > refit.serving_score or labels_of is by_the_default_model
        assert model.metrics.refits("entry", "swapped" if better else "kept") == 1
        # listed with its outcome and reason, what it compared and on what
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            (listed,) = (await http.get("/refits", params={"model_id": "entry"})).json()["refits"]
        assert (listed["outcome"], listed["reason"]) == (
            ("swapped", "better") if better else ("kept", "not_better")
        )
        assert (listed["candidate_version"], listed["candidate_score"], listed["rows"]) == (
            refit.candidate_version,
            refit.candidate_score,
            ROWS,
        )
        serving = model.manager.card("entry").version
        assert serving == (refit.candidate_version if better else DEFAULT_CARD.version)
        stored = model.serving.models["entry"]
        if better:
            # written to the registry and made the serving every replica follows
            assert refit.path == stored.path and refit.path.startswith(str(tmp_path))
            assert refit.path.encode() in await system.store.get(SERVING_KEY)
        else:
            assert refit.path is None and stored.path == str(DEFAULT_MODEL_PATH)
        # no new label since: no other refit is due
        assert await model.refit_if_due("entry") is None

        # predictions from now on name the version serving
        seen = await EventCollector("seen").attach(system.bus, "model.prediction")
        rng = np.random.default_rng(3)
        for i in range(5):
            values = tuple(float(v) for v in rng.normal(size=len(NAMES)))
            await system.bus.publish(vector_event(f"after{i}", START + 1.0, values=values))
        await seen.wait_until(lambda c: len(c.of("model.prediction")) == 5, what="predictions")
        assert {p.data.model_version for p in seen.of("model.prediction")} == {serving}


def test_a_refit_is_due_only_when_every_threshold_is_met():
    policy = RefitPolicy(every_labels=100, min_rows=500, min_interval_s=60.0)
    assert policy.due(new_labels=100, rows=500, since_last_s=60.0)
    assert not policy.due(new_labels=99, rows=500, since_last_s=60.0)
    assert not policy.due(new_labels=100, rows=499, since_last_s=60.0)
    assert not policy.due(new_labels=100, rows=500, since_last_s=59.9)
    assert policy.due(new_labels=500, rows=500, since_last_s=float("inf"))
    with pytest.raises(ValueError):
        RefitPolicy(min_rows=10, window_rows=5)


async def test_the_memory_store_counts_and_keeps_the_newest_labels_like_postgres(pg_pool):
    from pumpflow.model.labels import MemoryLabelStore, definition_key

    labels = synthetic_labels(by_rsi, n=300)
    memory = MemoryLabelStore(kept=200)
    postgres = PostgresLabelStore(pg_pool)
    of_model = ("entry", DEFAULT_CARD.feature_set_version, definition_key(DEFAULT_CARD.label))
    for store in (memory, postgres):
        added = await store.add(labels[:250], feature_set_version=of_model[1], names=NAMES)
        assert added == labels[:250]
        # the 50 stored already are kept once, and one given twice is new once: those
        # new come back in the order given
        again = [*labels[200:300], labels[260]]
        assert (
            await store.add(again, feature_set_version=of_model[1], names=NAMES) == labels[250:300]
        )
    counts = await postgres.counts(*of_model, after_id=100)
    assert (counts.rows, counts.new) == (300, 200)
    counts = await memory.counts(*of_model, after_id=100)
    assert (counts.rows, counts.new) == (200, 200)  # the newest 200 kept
    rows, last_id = await memory.recent(*of_model, 50)
    stored, stored_last = await postgres.recent(*of_model, 50)
    assert last_id == 300  # ids are the store's own: Postgres skips those of conflicts
    assert stored_last == await pg_pool.fetchval("SELECT max(id) FROM model_labels")
    np.testing.assert_array_equal(rows.rows, stored.rows)
    np.testing.assert_array_equal(rows.labels, stored.labels)
    np.testing.assert_array_equal(rows.time, stored.time)


def file_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


async def refit_into(registry_dir: Path, pg_pool, store: MemoryStateStore):
    """A refit swapped in by a service writing to ``registry_dir``, stored in ``pg_pool``
    and as the serving in ``store``; the refit."""
    labels = synthetic_labels(by_rsi)
    await PostgresLabelStore(pg_pool).add(
        labels, feature_set_version=DEFAULT_CARD.feature_set_version, names=NAMES
    )
    model = model_service(model_registry_dir=str(registry_dir), **REFIT_SETTINGS)
    async with run_embedded([model], clock=ReplayClock(START), db=pg_pool, store=store):
        await eventually(lambda: model.refits, within=120.0, what="an automatic refit")
    (refit,) = model.refits
    assert refit.swapped and refit.path.startswith(str(registry_dir))
    assert refit.sha256 == model_hash(file_bytes(refit.path))
    return refit


async def test_a_replica_on_another_disk_follows_a_refit_from_the_database(pg_pool, tmp_path):
    store = MemoryStateStore(ReplayClock(START))
    # the follower starts first, on the settings' model, with a registry of its own
    follower = model_service(
        model_registry_dir=str(tmp_path / "follower"),
        model_refit=False,
        model_serving_refresh_s=3600.0,
    )
    async with run_embedded(
        [follower], clock=ReplayClock(START), db=pg_pool, store=store
    ) as system:
        assert follower.manager.card("entry").version == DEFAULT_CARD.version
        refit = await refit_into(tmp_path / "fitter", pg_pool, store)
        written = file_bytes(refit.path)
        # the fitter's disk is another machine's: the follower never sees it
        shutil.rmtree(tmp_path / "fitter")
        assert await follower.refresh()
        assert follower.manager.card("entry").version == refit.candidate_version
        here = tmp_path / "follower" / "entry" / f"{refit.candidate_version}.onnx"
        assert here.read_bytes() == written and card_path(here).exists()
        assert follower.metrics.unavailable_count("follow") == 0
        # the follower names the file it read, not the fitter's
        app = create_app(follower, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            listed = (await http.get("/models")).json()["models"]
        assert listed["entry"]["path"] == str(here) != refit.path
        assert listed["entry"]["card"]["version"] == refit.candidate_version


async def test_a_restart_on_a_wiped_registry_serves_the_refit(pg_pool, tmp_path):
    store = MemoryStateStore(ReplayClock(START))
    registry_dir = tmp_path / "models"
    refit = await refit_into(registry_dir, pg_pool, store)
    shutil.rmtree(registry_dir)  # a container restarted: its temporary directory is new
    restarted = model_service(model_registry_dir=str(registry_dir), model_refit=False)
    async with run_embedded([restarted], clock=ReplayClock(START), db=pg_pool, store=store):
        assert restarted.manager.card("entry").version == refit.candidate_version
        assert model_hash(file_bytes(refit.path)) == refit.sha256  # written there again
        assert restarted.serving.models["entry"].sha256 == refit.sha256
        assert restarted.metrics.unavailable_count("start") == 0


async def test_a_stored_serving_whose_model_is_gone_everywhere_starts_on_the_settings(
    pg_pool, tmp_path, caplog
):
    store = MemoryStateStore(ReplayClock(START))
    gone = str(tmp_path / "gone" / "entry" / "v-gone.onnx")
    # a refitted model neither on this disk nor in the database
    stored = {
        "revision": 7,
        "models": {
            "entry": msgspec.to_builtins(
                ModelSource(path=gone, loaded=7, sha256=model_hash(b"gone"))
            )
        },
        "arms": [{"name": "control", "model_id": "entry"}],
    }
    await store.set(SERVING_KEY, msgspec.json.encode(stored))
    model = model_service(model_registry_dir=str(tmp_path / "models"), model_refit=False)
    with caplog.at_level(logging.ERROR, logger="pumpflow.model"):
        async with run_embedded([model], clock=ReplayClock(START), db=pg_pool, store=store):
            assert model.manager.card("entry").version == DEFAULT_CARD.version
            assert model.serving.models["entry"].path == str(DEFAULT_MODEL_PATH)
            # at the stored revision: not retried every poll, the next change followed
            assert model.serving.revision == 7
            assert model.metrics.unavailable_count("start") == 1
    (error,) = [r.getMessage() for r in caplog.records if "revision 7" in r.getMessage()]
    assert gone in error
    # the serving stored for the other replicas is left as it was
    assert msgspec.json.decode(await store.get(SERVING_KEY))["models"]["entry"]["path"] == gone


@pytest.mark.redis
async def test_a_refit_whose_serving_cannot_be_stored_is_not_served_here_alone(
    pg_pool, tmp_path, own_redis, namespace
):
    from pumpflow.common.state.redis import RedisStateStore

    await PostgresLabelStore(pg_pool).add(
        synthetic_labels(by_rsi),
        feature_set_version=DEFAULT_CARD.feature_set_version,
        names=NAMES,
    )
    store = RedisStateStore(url=own_redis.url, namespace=namespace)
    settings = {**REFIT_SETTINGS, "model_refit": False, "model_serving_refresh_s": 3600.0}
    model = model_service(model_registry_dir=str(tmp_path), **settings)
    try:
        async with run_embedded([model], clock=ReplayClock(START), db=pg_pool, store=store):
            await asyncio.to_thread(own_redis.stop)
            try:
                with pytest.raises(Exception):  # noqa: B017 - whatever the client raises
                    await model.refit_if_due("entry")
            finally:
                await asyncio.to_thread(own_redis.start)
            # the other replicas go on with the serving stored: so does this one
            assert model.manager.card("entry").version == DEFAULT_CARD.version
            assert model.drift["entry"].card.version == DEFAULT_CARD.version
            assert model.serving.models["entry"].path == str(DEFAULT_MODEL_PATH)
            # and the refit is recorded as what it is: chosen, kept
            refit = await PostgresLabelStore(pg_pool).last_refit("entry")
            assert refit.sha256 is not None and not refit.swapped
            assert model.metrics.refits("entry", "kept", "not_served") == 1
            assert model.metrics.refits("entry", "swapped") == 0
    finally:
        await store.close()


async def test_a_refit_served_whose_swap_was_not_recorded_is_marked_by_the_next_check(
    pg_pool, tmp_path, monkeypatch
):
    await PostgresLabelStore(pg_pool).add(
        synthetic_labels(by_rsi),
        feature_set_version=DEFAULT_CARD.feature_set_version,
        names=NAMES,
    )
    settings = {**REFIT_SETTINGS, "model_refit": False}
    model = model_service(model_registry_dir=str(tmp_path), **settings)
    async with run_embedded([model], clock=ReplayClock(START), db=pg_pool):
        store = model.label_store

        async def database_gone(refit) -> bool:
            raise ConnectionError("the database went away")

        with monkeypatch.context() as patched:
            patched.setattr(store, "record_swap", database_gone)
            with pytest.raises(ConnectionError):
                await model.refit_if_due("entry")
        kept = await store.last_refit("entry")
        assert not kept.swapped
        assert model.serving.models["entry"].sha256 == kept.sha256  # served everywhere

        def counted() -> tuple[float, float]:
            return model.metrics.refits("entry", "kept"), model.metrics.refits("entry", "swapped")

        assert counted() == (0, 0)  # neither kept nor swapped until marked
        assert await model.refit_if_due("entry") is None  # no refit due: marked
        assert await store.last_refit("entry") == msgspec.structs.replace(kept, swapped=True)
        assert counted() == (0, 1)
        # another replica's check that read it kept before the mark counts it no more
        assert (await model._swap_recorded(kept)).swapped
        assert counted() == (0, 1)


async def test_a_vector_one_model_scored_on_two_arms_is_refitted_on_once(pg_pool):
    from pumpflow.model.labels import MemoryLabelStore, definition_key

    # the model live on an arm and shadowing every token on another: the tokens of the
    # live arm are labelled twice, the same vector, score and label
    labels = synthetic_labels(by_rsi, n=200)
    shadow = [msgspec.structs.replace(label, arm="shadow") for label in labels[::2]]
    of_model = ("entry", DEFAULT_CARD.feature_set_version, definition_key(DEFAULT_CARD.label))
    for store in (MemoryLabelStore(), PostgresLabelStore(pg_pool)):
        await store.add([*labels, *shadow], feature_set_version=of_model[1], names=NAMES)
        rows, _ = await store.recent(*of_model, 1_000)
        assert len(rows.labels) == len(labels)
        np.testing.assert_array_equal(rows.time, [label.time for label in labels])
        np.testing.assert_array_equal(rows.labels, [label.label for label in labels])
        # the newest limit: distinct vectors
        rows, _ = await store.recent(*of_model, 50)
        np.testing.assert_array_equal(rows.time, [label.time for label in labels[-50:]])


async def test_a_model_loaded_while_it_was_refitted_is_not_replaced_by_the_refit(tmp_path):
    """An operator loads another file as ``entry`` (through another replica) after the
    refit of the one serving before was fitted, before its serving is stored: the refit,
    fitted on and compared with the model no longer served, does not undo the load."""
    from model_helpers import other_model

    from pumpflow.common.model import read_model
    from pumpflow.model.labels import MemoryLabelStore
    from pumpflow.model.service import ServingError

    loaded = other_model(tmp_path, model_id="entry")

    def with_loaded(serving):
        source = ModelSource(path=str(loaded), loaded=serving.revision + 1)
        return msgspec.structs.replace(serving, models={**serving.models, "entry": source})

    class LoadedMeanwhile(MemoryLabelStore):
        async def record_refit(self, refit, *, model=None, card=None) -> None:
            await super().record_refit(refit, model=model, card=card)
            await service.change(with_loaded)

    store = LoadedMeanwhile()
    await store.add(
        synthetic_labels(by_rsi), feature_set_version=DEFAULT_CARD.feature_set_version, names=NAMES
    )
    service = ModelService(
        ModelSettings.load(
            service="model",
            transport="memory",
            model_registry_dir=str(tmp_path / "registry"),
            **{**REFIT_SETTINGS, "model_refit": False},
        ),
        registry=CollectorRegistry(),
        refitter=LightGBMRefitter(config=TrainConfig(n_estimators=30)),
        label_store=store,
    )
    async with run_embedded([service], clock=ReplayClock(START)):
        with pytest.raises(ServingError, match="changed while it was refitted"):
            await service.refit_if_due("entry")
        assert service.manager.card("entry").version == read_model(loaded)[1].version
        assert service.serving.models["entry"].path == str(loaded)
        refit = await store.last_refit("entry")
        assert refit.sha256 is not None and not refit.swapped


@pytest.fixture(params=["memory", "postgres"])
def database(request):
    """The run's database (None: an embedded run's labels in memory)."""
    return None if request.param == "memory" else request.getfixturevalue("pg_pool")


async def test_a_refit_prunes_the_labels_no_refit_reads(database, tmp_path):
    """Before refitting, the model's labels older than the policy keeps (twice the window)
    are deleted; the refit is given the newest window, the check counts the rest."""
    window = ROWS // 8
    labels = synthetic_labels(by_rsi)
    model = model_service(
        model_registry_dir=str(tmp_path),
        **{
            **REFIT_SETTINGS,
            "model_refit_window_rows": window,
            "model_refit_min_rows": window,
            "model_refit_check_s": 3_600.0,
        },
    )
    of_model = ("entry", DEFAULT_CARD.feature_set_version, definition_key(DEFAULT_CARD.label))
    async with run_embedded([model], clock=ReplayClock(START), db=database):
        store = model.label_store
        assert isinstance(store, MemoryLabelStore if database is None else PostgresLabelStore)
        await store.add(labels, feature_set_version=of_model[1], names=NAMES)
        refit = await model.refit_if_due("entry")
        assert refit is not None and refit.rows == window
        counts = await store.counts(*of_model, after_id=0)
        assert counts.rows == 2 * window
        rows, _ = await store.recent(*of_model, ROWS)
        np.testing.assert_array_equal(rows.time, [label.time for label in labels[-2 * window :]])
        counts = await store.counts(*of_model, after_id=refit.last_label_id)
        assert counts.new == 0


async def test_live_figures_a_store_lost_under_a_running_replica_are_filled_again_from_the_labels(
    pg_pool,
):
    clock = ReplayClock(START)
    vectors = seed5_vectors(240.0)
    store = LosingStore(clock)
    model = model_service(model_monitor_s=0.05, model_live_read_s=0.05, model_refit=False)
    async with run_embedded([model], clock=clock, db=pg_pool, store=store) as system:
        await feed(system, clock, vectors)
        await clock.advance_to(vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0)
        await eventually(lambda: model.labels.pending == 0, what="every label released")

        async def all_stored_counted() -> bool:
            stored = await pg_pool.fetchval("SELECT count(*) FROM model_labels")
            figures = model.performance.figures("entry", "control")
            return figures is not None and figures.labels == stored

        await eventually(all_stored_counted, what="every label stored counted")
        assert model.performance.figures("entry", "control").labels > 50
        lost_at = time.monotonic()
        store.lose()  # Redis restarted empty under the running replica
        await eventually(lambda: model._read_at > lost_at, what="a read of the shared windows")
        await eventually(all_stored_counted, what="the live figures filled again")
