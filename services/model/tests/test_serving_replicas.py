"""What the replicas share through Redis. The serving (models, arm table): changes made
through different replicas at once are each made on the one before, and every replica
ends up serving the same table. The live figures: every replica answers the
deployment's. Drift: each crossing is announced once, whichever replicas see it and
however often they restart."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest
from model_helpers import DEFAULT_CARD, START, vector_event
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import ModelDrift
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.testing import BusHarness, FeatureUpdates, eventually
from pumpflow.model.labels import MemoryLabelStore
from pumpflow.model.service import ModelService, ModelSettings
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

pytestmark = [pytest.mark.redis]

TOKEN = "sesame"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def start_replica(name: str, buses: BusHarness, store, clock, db=None) -> ModelService:
    settings = ModelSettings.load(
        service="model",
        transport="memory",
        partitions=4,
        replica=name,
        api_token=TOKEN,
        model_monitor_s=3600.0,
        model_refit=False,
        model_serving_refresh_s=3600.0,
    )
    service = ModelService(settings, registry=CollectorRegistry(), label_store=MemoryLabelStore())
    await service.start(
        ServiceContext(
            settings=settings, bus=await buses.bus("model"), clock=clock, store=store, db=db
        )
    )
    return service


def client(service: ModelService) -> httpx.AsyncClient:
    app = create_app(service, service._ctx)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://model")


@pytest.fixture
async def replicas(namespace, redis_url):
    from pumpflow.common.state.redis import RedisStateStore

    clock = ReplayClock(START)
    buses = BusHarness("memory", namespace=namespace, partitions=4)
    store = RedisStateStore(url=redis_url, namespace=namespace)
    started: list[ModelService] = []
    try:
        for name in ("m1", "m2"):
            started.append(await start_replica(name, buses, store, clock))
        yield [(s, client(s)) for s in started]
    finally:
        for service in started:
            await service.stop()
        await buses.teardown()
        await store.delete_many(await store.scan_keys(""))
        await store.close()


async def test_changes_through_two_replicas_at_once_are_both_kept_and_followed(replicas):
    (first, one), (second, two) = replicas
    arms = [{"name": "control", "model_id": "entry"}, {"name": "treatment", "model_id": "entry"}]
    assert (await one.put("/arms", json={"arms": arms}, headers=AUTH)).status_code == 200
    for round_ in range(1, 6):

        async def weigh(client, arm: str, weight: float) -> httpx.Response:
            await asyncio.sleep(0)
            return await client.put("/arms/weights", json={"weights": {arm: weight}}, headers=AUTH)

        answers = await asyncio.gather(
            weigh(one, "control", float(round_)), weigh(two, "treatment", 10.0 + round_)
        )
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        # each change was made on the other's: two revisions, both weights stored
        assert answers[0].json()["revision"] != answers[1].json()["revision"]
        for service in (first, second):
            await service.refresh()
            weights = {arm.name: arm.weight for arm in service.processor.arms.arms}
            assert weights == {"control": float(round_), "treatment": 10.0 + round_}
        assert first.processor.arms == second.processor.arms


async def test_a_change_here_while_following_another_replicas_is_not_undone(replicas):
    (first, _), (second, _) = replicas

    def weighed(weight: float):
        def change(serving):
            return msgspec.structs.replace(
                serving, arms=serving.table().with_weights({"control": weight}).arms
            )

        return change

    await second.change(weighed(2.0))
    # connections for both at once: the read of the follow is answered before the change's
    store = first._ctx.store
    await asyncio.gather(*(store.get(f"warm{i}") for i in range(4)))
    # a change here starts as the other replica's is being followed
    mine, _ = await asyncio.gather(first.change(weighed(3.0)), first.refresh())
    assert first.serving.revision == mine.revision == second.serving.revision + 1
    assert first.processor.arms.arm("control").weight == 3.0


async def test_a_serving_the_store_lost_is_stored_again_for_the_replicas_to_come(
    own_redis, namespace
):
    import redis.exceptions

    from pumpflow.common.state.redis import RedisStateStore

    clock = ReplayClock(START)
    buses = BusHarness("memory", namespace=namespace, partitions=4)
    store = RedisStateStore(url=own_redis.url, namespace=namespace)
    started: list[ModelService] = []
    try:
        first = await start_replica("m1", buses, store, clock)
        started.append(first)
        async with client(first) as http:
            arms = [
                {"name": "control", "model_id": "entry", "weight": 0.3},
                {"name": "treatment", "model_id": "entry", "weight": 0.7},
            ]
            changed = await http.put("/arms", json={"arms": arms}, headers=AUTH)
            assert changed.status_code == 200, changed.text
        # the deployment's Redis keeps nothing over a restart
        await asyncio.to_thread(own_redis.stop)
        await asyncio.to_thread(own_redis.start)

        async def refreshed() -> bool:
            # a connection from before the restart fails its first command; the service's
            # loop reads again at its next round
            try:
                await first.refresh()
            except redis.exceptions.ConnectionError:
                return False
            return True

        await eventually(refreshed, what="the serving read again")
        later = await start_replica("m2", buses, store, clock)
        started.append(later)
        assert later.serving.revision == first.serving.revision == changed.json()["revision"]
        assert later.processor.arms == first.processor.arms
        # and the next change, wherever made, is followed by both
        async with client(later) as http:
            weights = {"weights": {"control": 0.5}}
            assert (await http.put("/arms/weights", json=weights, headers=AUTH)).status_code == 200
        assert await first.refresh()
        assert first.processor.arms == later.processor.arms
    finally:
        for service in started:
            await service.stop()
        await buses.teardown()
        await store.close()


async def test_a_change_is_made_on_the_newer_of_the_stored_serving_and_this_ones(replicas):
    from pumpflow.model.service import SERVING_KEY

    (first, one), _ = replicas
    arms = [
        {"name": "control", "model_id": "entry", "weight": 0.3},
        {"name": "treatment", "model_id": "entry", "weight": 0.7},
    ]
    assert (await one.put("/arms", json={"arms": arms}, headers=AUTH)).status_code == 200
    # the store holds an older serving (one stored again by a replica that had not
    # followed this one yet)
    older = msgspec.structs.replace(first.serving, revision=0, arms=first.serving.arms[:1])
    await first._ctx.store.set(SERVING_KEY, msgspec.json.encode(older))
    weights = {"weights": {"treatment": 0.9}}
    answer = await one.put("/arms/weights", json=weights, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert {arm["name"]: arm["weight"] for arm in answer.json()["arms"]} == {
        "control": 0.3,
        "treatment": 0.9,
    }
    assert answer.json()["revision"] == 2


async def test_a_removal_and_an_unload_are_followed_by_the_other_replicas(replicas, tmp_path):
    from model_helpers import other_model

    (first, one), (second, two) = replicas
    body = {"model_id": "candidate", "path": str(other_model(tmp_path, model_id="candidate"))}
    assert (await one.post("/models", json=body, headers=AUTH)).status_code == 200
    arms = [
        {"name": "control", "model_id": "entry"},
        {"name": "treatment", "model_id": "candidate"},
    ]
    assert (await one.put("/arms", json={"arms": arms}, headers=AUTH)).status_code == 200
    assert await second.refresh()
    assert set(second.manager.models()) == {"entry", "candidate"}
    removed = await two.delete("/arms/treatment", headers=AUTH)
    assert removed.status_code == 200, removed.text
    assert await first.refresh()
    assert [arm.name for arm in first.processor.arms.arms] == ["control"]
    unloaded = await one.delete("/models/candidate", headers=AUTH)
    assert unloaded.status_code == 200, unloaded.text
    assert await second.refresh()
    for service in (first, second):
        assert service.serving.revision == unloaded.json()["revision"]
        assert set(service.manager.models()) == set(service.drift) == {"entry"}
        assert service.processor.arms == first.processor.arms


async def scored_arms(
    service: ModelService, seen, mints: list[str], at: float, seq: int
) -> dict[str, str]:
    """Each of ``mints``' live arm for a vector of each at ``at`` (seq ``seq``)."""
    await service._ctx.clock.advance_to(at)
    vectors = [vector_event(m, at, seq=seq) for m in mints]
    ids = {v.id for v in vectors}
    await service._ctx.bus.publish_many(vectors)

    def scored(collected) -> list:
        return [e for e in collected.of("model.prediction") if e.causation_id in ids]

    await seen.wait_until(lambda c: len(scored(c)) >= len(mints), what="a prediction each")
    found = {e.key: e.data.arm for e in scored(seen)}
    assert set(found) == set(mints)
    return found


async def test_a_tokens_arm_and_a_removal_outlive_a_restart_of_the_model_service(
    namespace, redis_url
):
    """A token scored by an arm stays with it after the shares change, over a restart
    (its arm is in its keyed state); a removal is in the serving stored, and the removed
    arm's tokens go to the arms left by their hash after the next restart."""
    from pumpflow.common.model.arms import ArmTable
    from pumpflow.common.state.redis import RedisStateStore
    from pumpflow.common.testing import base58_key

    clock = ReplayClock(START)
    buses = BusHarness("memory", namespace=namespace, partitions=4)
    store = RedisStateStore(url=redis_url, namespace=namespace)
    mints = [base58_key(f"restarted{i}") for i in range(60)]
    arms = [
        {"name": "control", "model_id": "entry", "weight": 0.4},
        {"name": "treatment", "model_id": "entry", "weight": 0.4},
        {"name": "third", "model_id": "entry", "weight": 0.2},
    ]
    running: list[ModelService] = []

    async def restart() -> ModelService:
        await running.pop().stop()
        running.append(await start_replica("m1", buses, store, clock))
        return running[-1]

    try:
        running.append(await start_replica("m1", buses, store, clock))
        seen = await buses.collector("model.prediction")
        async with client(running[-1]) as http:
            assert (await http.put("/arms", json={"arms": arms}, headers=AUTH)).is_success
            first = await scored_arms(running[-1], seen, mints, START, 1)
            assert set(first.values()) == {"control", "treatment", "third"}
            weights = {"weights": {"control": 0.1, "treatment": 0.7}}
            assert (await http.put("/arms/weights", json=weights, headers=AUTH)).is_success
        reweighted = ArmTable(running[-1].processor.arms.arms)
        assert any(reweighted.live_arm(m).name != arm for m, arm in first.items())
        service = await restart()
        assert service.processor.arms.arm("treatment").weight == 0.7
        assert await scored_arms(service, seen, mints, START + 1.0, 2) == first

        async with client(service) as http:
            assert (await http.delete("/arms/treatment", headers=AUTH)).is_success
        service = await restart()
        assert [arm.name for arm in service.processor.arms.arms] == ["control", "third"]
        left = service.processor.arms  # control 0.1, third 0.2: their hash places them
        after = await scored_arms(service, seen, mints, START + 2.0, 3)
        orphans = {m for m, arm in first.items() if arm == "treatment"}
        assert orphans
        assert after == {m: left.live_arm(m).name if m in orphans else first[m] for m in mints}
        assert service.processor.reassigned == {"treatment": len(orphans)}
        # placed once more, they stay: a later restart finds them where they went
        service = await restart()
        assert await scored_arms(service, seen, mints, START + 3.0, 4) == after
    finally:
        for service in running:
            await service.stop()
        await buses.teardown()
        await store.delete_many(await store.scan_keys(""))
        await store.close()


def labels_released(model: ModelService) -> bool:
    """Whether no token held by ``model`` has labels waiting."""
    states = map(model.consumer.state, list(model.consumer.keys()))
    return all(state is None or state.labels is None for state in states)


@pytest.fixture
async def split_replicas(namespace, redis_url):
    """Two replicas on one Redis, each given the tokens of half the partitions (a bus
    each: the split a balanced bus makes, fixed)."""
    from pumpflow.common.state.redis import RedisStateStore

    clock = ReplayClock(START)
    harnesses = [BusHarness("memory", namespace=namespace, partitions=4) for _ in range(2)]
    store = RedisStateStore(url=redis_url, namespace=namespace)
    started: list[ModelService] = []
    try:
        for name, buses in zip(("m1", "m2"), harnesses, strict=True):
            started.append(await start_replica(name, buses, store, clock))
        yield [(s, client(s)) for s in started]
    finally:
        for service in started:
            await service.stop()
        for buses in harnesses:
            await buses.teardown()
        await store.delete_many(await store.scan_keys(""))
        await store.close()


async def test_every_replica_answers_the_live_figures_of_the_deployment(split_replicas):
    (first, one), (second, two) = split_replicas
    clock = first._ctx.clock
    vectors = FeatureUpdates().of(
        market_events(Market(MarketConfig(seed=5)), 60.0, start_epoch=START, source="feed/sim")
    )
    await clock.advance_to(vectors[-1].time)
    halves = (
        [v for v in vectors if partition_of(v.key, 4) < 2],
        [v for v in vectors if partition_of(v.key, 4) >= 2],
    )
    for service, half in zip((first, second), halves, strict=True):
        await service._ctx.bus.publish_many(half)

    def all_applied() -> bool:
        counts = [s.consumer_metrics.counts() for s in (first, second)]
        return sum(c["applied"] + c["duplicates"] for c in counts) >= len(vectors)

    await eventually(all_applied, what="every vector applied")
    followed = [first.labels.pending, second.labels.pending]
    assert min(followed) > 5, followed
    await clock.advance_to(vectors[-1].time + DEFAULT_CARD.label.horizon_s + 5.0)
    for service in (first, second):
        await eventually(lambda s=service: labels_released(s), what="every label released")
        await service.consumer.flush()
    # a round of each replica's monitor adds the labels it counted
    for service in (first, second):
        await service.share_performance()
    answers = [
        (await http.get("/models/entry/performance", params={"fresh": "true"})).json()
        for http in (one, two)
    ]
    assert answers[0]["live"] == answers[1]["live"]
    live = answers[0]["live"]["control"]
    assert live["labels"] == sum(followed)
    for service in (first, second):
        figures = service.manager.get_model_performance("entry").live["control"]
        assert figures.labels == live["labels"]
        assert figures.metrics["brier"] == live["metrics"]["brier"]
        # and the gauges of either replica
        service.resolve_labels()
        assert service.metrics.live("entry", "control", "brier") == live["metrics"]["brier"]


#: every feature far outside the card's reference, a drift window's worth
FAR = [vector_event("far", START, values=(1e9,) * len(DEFAULT_CARD.feature_names))] * 3_000


async def observe(service: ModelService, events) -> None:
    service._observe_drift(events)
    await service._publish_drift()


def transition(feature: str, state: str) -> ModelDrift:
    return ModelDrift(
        model_id="entry",
        version=DEFAULT_CARD.version,
        feature=feature,
        state=state,
        psi=0.05,
        threshold=0.1,
        observations=6_000,
    )


async def test_drift_is_announced_once_per_crossing_whatever_replicas_see_and_restart(
    namespace, redis_url
):
    from pumpflow.common.state.redis import RedisStateStore

    clock = ReplayClock(START)
    buses = BusHarness("memory", namespace=namespace, partitions=4)
    store = RedisStateStore(url=redis_url, namespace=namespace)
    running: list[ModelService] = []
    far = FAR
    try:
        for name in ("m1", "m2"):
            running.append(await start_replica(name, buses, store, clock))
        first, second = running
        seen = await buses.collector("model.drift")
        await observe(first, far)
        drifting = first.drift["entry"].drifting
        assert drifting
        # the other replica sees the same drift, and the first one again after a restart
        await observe(second, far)
        await first.stop()
        running.remove(first)
        restarted = await start_replica("m1", buses, store, clock)
        running.append(restarted)
        assert restarted.drift["entry"].drifting == drifting
        await observe(restarted, far)

        # both see a recovery: announced once; a drift after it is the next crossing
        for service in (second, restarted):
            service._drift_out.append(transition(drifting[0], "recovered"))
            await service._publish_drift()
        second._drift_out.append(transition(drifting[0], "drifting"))
        await second._publish_drift()
        expected = [
            *((name, "drifting") for name in drifting),
            (drifting[0], "recovered"),
            (drifting[0], "drifting"),
        ]
        await seen.wait_until(
            lambda c: len(c.of("model.drift")) >= len(expected),
            what="the drift, its recovery and the next drift",
        )
        await buses.buses[0].drain(5.0)
        assert [(e.data.feature, e.data.state) for e in seen.of("model.drift")] == expected
        counted = sum(
            s.metrics.drift_transitions("entry", state)
            for s in (first, second, restarted)
            for state in ("drifting", "recovered")
        )
        assert counted == len(expected)
    finally:
        for service in running:
            await service.stop()
        await buses.teardown()
        await store.delete_many(await store.scan_keys(""))
        await store.close()


async def test_a_drift_announced_before_the_store_came_back_empty_recovers_announced_once(
    namespace, redis_url, pg_pool
):
    """With a database the drift announced is kept in Postgres: Redis restarted empty
    forgets nothing of it, and the recovery seen by every replica goes out once."""
    from pumpflow.common.state.redis import RedisStateStore

    clock = ReplayClock(START)
    buses = BusHarness("memory", namespace=namespace, partitions=4)
    store = RedisStateStore(url=redis_url, namespace=namespace)
    running: list[ModelService] = []
    try:
        for name in ("m1", "m2"):
            running.append(await start_replica(name, buses, store, clock, db=pg_pool))
        first, second = running
        seen = await buses.collector("model.drift")
        await observe(first, FAR)
        await observe(second, FAR)
        drifting = first.drift["entry"].drifting
        assert drifting
        await store.delete_many(await store.scan_keys(""))  # Redis restarted empty
        await first.stop()
        running.remove(first)
        restarted = await start_replica("m1", buses, store, clock, db=pg_pool)
        running.append(restarted)
        assert restarted.drift["entry"].drifting == drifting
        for service in (second, restarted):
            service._drift_out.append(transition(drifting[0], "recovered"))
            await service._publish_drift()
        expected = [*((name, "drifting") for name in drifting), (drifting[0], "recovered")]
        await seen.wait_until(
            lambda c: len(c.of("model.drift")) >= len(expected), what="the drift and its recovery"
        )
        await buses.buses[0].drain(5.0)
        assert [(e.data.feature, e.data.state) for e in seen.of("model.drift")] == expected
    finally:
        for service in running:
            await service.stop()
        await buses.teardown()
        await store.delete_many(await store.scan_keys(""))
        await store.close()


async def test_a_drift_announced_in_postgres_longer_ago_than_the_ttl_counts_as_none(pg_pool):
    """A model taken out of service leaves its drift announced: forgotten after the TTL,
    as the state store's key expires."""
    from pumpflow.model.announced import PostgresDriftAnnouncements

    announced = PostgresDriftAnnouncements(pg_pool, ttl=3600.0)
    drift, recovery = transition("buys", "drifting"), transition("buys", "recovered")
    assert await announced.claim(drift)
    assert not await announced.claim(drift)
    assert await announced.drifting("entry", ["sells", "buys", "age_s"]) == ["buys"]
    await pg_pool.execute(
        "UPDATE model_drift_announced SET announced_at = now() - interval '2 hours'"
    )
    assert await announced.drifting("entry", ["buys"]) == []
    assert await announced.claim(drift)  # a new crossing
    assert await announced.claim(recovery)
    assert not await announced.claim(recovery)
    assert await announced.claim(drift)
    await pg_pool.execute(
        "UPDATE model_drift_announced SET announced_at = now() - interval '2 hours'"
    )
    assert not await announced.claim(recovery)  # forgotten: nothing left to announce
    assert await announced.drifting("entry", ["buys"]) == []


async def test_outcomes_the_index_of_the_shared_windows_refuses_are_not_appended(
    namespace, redis_url
):
    """The index of the shared windows holds something else (written by another
    program): the append fails and adds nothing to the windows, so the replica's retry,
    once the key is gone, counts its outcomes once."""
    from pumpflow.common.model.performance import Outcome
    from pumpflow.common.state.abc import WrongKind
    from pumpflow.common.state.redis import RedisStateStore
    from pumpflow.model.live import INDEX_KEY, StoreOutcomes

    store = RedisStateStore(url=redis_url, namespace=namespace)
    try:
        await store.set(INDEX_KEY, b"written by something else")
        shared = StoreOutcomes(store)
        outcome = Outcome(score=0.7, label=1.0, version="v1", resolved_at=START, breakeven=0.4)
        with pytest.raises(WrongKind) as refused:
            await shared.append({("entry", "control"): [outcome]}, keep=10)
        assert (refused.value.key, refused.value.kind) == (INDEX_KEY, "value")
        await store.delete_many([INDEX_KEY])
        await shared.append({("entry", "control"): [outcome]}, keep=10)
        assert await shared.read() == {("entry", "control"): [outcome]}
    finally:
        await store.delete_many(await store.scan_keys(""))
        await store.close()


async def test_a_serving_not_followed_for_one_missing_file_leaves_every_model_serving(
    replicas, tmp_path
):
    """The newer serving replaces ``entry`` and adds a model whose file this replica lacks:
    it is not followed, and ``entry`` is not half followed either (a new file scored under
    the old table, the one the other replicas route by)."""
    from model_helpers import other_model

    from pumpflow.model.service import SERVING_KEY, ModelSource

    (first, _), _ = replicas
    serving = first.serving
    newer = msgspec.structs.replace(
        serving,
        revision=serving.revision + 1,
        models={
            "entry": ModelSource(path=str(other_model(tmp_path, model_id="entry")), loaded=1),
            "treatment": ModelSource(path=str(tmp_path / "absent.onnx"), loaded=1),
        },
        arms=(
            *serving.arms,
            msgspec.convert(
                {"name": "treatment", "model_id": "treatment"}, type=type(serving.arms[0])
            ),
        ),
    )
    await first._ctx.store.set(SERVING_KEY, msgspec.json.encode(newer))
    assert not await first.refresh()
    assert first.metrics.unavailable_count("follow") == 1
    assert first.serving.revision == serving.revision
    assert first.manager.card("entry").version == DEFAULT_CARD.version
    assert set(first.manager.models()) == {"entry"}
