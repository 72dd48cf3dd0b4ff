"""The model service embedded: a simulated market through features, activity and model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from model_helpers import DEFAULT_CARD, other_model, vector_event
from prometheus_client import CollectorRegistry

from pumpflow.activity.service import ActivityService
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import ModelDrift
from pumpflow.common.model.arms import ArmTable
from pumpflow.common.model.metrics import auc
from pumpflow.common.model.processor import SKIP_REASONS
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.http import create_app
from pumpflow.common.testing import EventCollector, FeatureUpdates, eventually
from pumpflow.features.service import FeaturesService
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.metrics import SERVING_CHANGES
from pumpflow.model.service import ModelService, ModelSettings
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

START = 1_700_000_000.0
TOKEN = "sesame"


def market(seed: int = 5, seconds: float = 240.0):
    return list(
        market_events(
            Market(MarketConfig(seed=seed)), seconds, start_epoch=START, source="feed/sim"
        )
    )


def model_service(**settings) -> ModelService:
    return ModelService(
        ModelSettings.load(service="model", transport="memory", api_token=TOKEN, **settings),
        registry=CollectorRegistry(),
    )


async def replay(system, clock, events) -> None:
    for event in events:
        await clock.advance_to(event.time)
        await system.bus.publish(event)
    await system.drain()


async def test_predictions_flow_from_a_simulated_market_with_the_default_model():
    clock = ReplayClock(START)
    events = market()
    model = model_service()
    async with run_embedded([FeaturesService, ActivityService, model], clock=clock) as system:
        seen = await EventCollector("seen").attach(
            system.bus, "model.prediction", "features.updated", "token.lifecycle"
        )
        await asyncio.wait_for(replay(system, clock, events), 120.0)
        await seen.wait_until(lambda c: len(c.of("model.prediction")) > 50, what="predictions")
        await system.drain()
        predictions = seen.of("model.prediction")
        vectors = {e.id: e for e in seen.of("features.updated")}
        for event in predictions:
            data = event.data
            assert (data.model_id, data.arm, data.shadow) == ("entry", "control", False)
            assert data.model_version == DEFAULT_CARD.version
            assert 0.0 <= data.score <= 1.0
            # caused by the vector it scored, stamped with its time, keyed by its mint
            scored = vectors[event.causation_id]
            assert (event.key, event.time) == (scored.key, scored.time)
            assert data.source_seq == scored.data.source_seq
        # per mint: sequenced, and at most once per min_interval_s of event time
        by_mint: dict[str, list] = {}
        for event in predictions:
            by_mint.setdefault(event.key, []).append(event)
        for mine in by_mint.values():
            assert [e.seq for e in mine] == list(range(1, len(mine) + 1))
            times = [e.time for e in mine]
            assert all(b - a >= 0.5 for a, b in itertools.pairwise(times))
        assert model.processor.prepared_rows > 0  # batches were scored ahead
        # live performance: past the horizon every prediction's label is out
        await clock.advance(DEFAULT_CARD.label.horizon_s + 10.0)
        await model.consumer.flush()  # its commits hand the labels released out
        model.resolve_labels()
        assert model.labels.pending == 0
        figures = model.performance.figures("entry", "control")
        assert figures is not None and figures.labels > 0
        assert figures.versions == (DEFAULT_CARD.version,)
        labels, scores = model.performance.window_of("entry", "control")
        assert figures.metrics["auc"] == pytest.approx(auc(labels, scores), nan_ok=True)
        assert model.metrics.predictions("control", "entry", DEFAULT_CARD.version) == len(
            predictions
        )
        assert model.metrics.published() == len(predictions)


async def test_arms_weights_and_promotion_change_through_the_api_without_a_restart(tmp_path):
    clock = ReplayClock(START)
    events = market(seed=6, seconds=300.0)
    candidate = other_model(tmp_path, model_id="candidate")
    model = model_service()
    async with run_embedded([FeaturesService, ActivityService, model], clock=clock) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.prediction")
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            body = {"model_id": "candidate", "path": str(candidate)}
            assert (await http.post("/models", json=body)).status_code == 401
            loaded = await http.post("/models", json=body, headers=auth)
            assert loaded.status_code == 200, loaded.text
            arms = [
                {"name": "control", "model_id": "entry", "weight": 0.5},
                {"name": "treatment", "model_id": "candidate", "weight": 0.5},
                {"name": "shadow", "model_id": "candidate", "shadow": True},
            ]
            answer = await http.put("/arms", json={"arms": arms}, headers=auth)
            assert answer.status_code == 200, answer.text
            half = len(events) // 2
            await asyncio.wait_for(replay(system, clock, events[:half]), 120.0)
            table = ArmTable.decode(
                ArmTable(model.processor.arms.arms, salt=model.processor.arms.salt).encode()
            )
            first = seen.of("model.prediction")
            live = [e for e in first if not e.data.shadow]
            assert live and {e.data.arm for e in live} == {"control", "treatment"}
            for event in live:
                assert event.data.arm == table.live_arm(event.key).name
            # every live prediction has its shadow twin, same vector, marked shadow
            shadows = {e.causation_id for e in first if e.data.shadow}
            assert shadows == {e.causation_id for e in live}

            promoted = await http.post("/arms/treatment/promote", headers=auth)
            assert promoted.status_code == 200, promoted.text
            mark = len(first)
            await asyncio.wait_for(replay(system, clock, events[half:]), 120.0)
            later = [e for e in seen.of("model.prediction")[mark:] if not e.data.shadow]
            assert later and {e.data.arm for e in later} == {"treatment"}

            weights = await http.put("/arms/weights", json={"weights": {"nope": 1.0}}, headers=auth)
            assert weights.status_code == 422
            listed = (await http.get("/models")).json()["models"]
            assert set(listed) == {"entry", "candidate"}
            assert listed["entry"]["card"]["version"] == DEFAULT_CARD.version
            performance = (await http.get("/models/entry/performance")).json()
            assert performance["served"]["rows"] > 0
            drift = (await http.get("/models/entry/drift")).json()
            assert drift["seen"] > 0 and len(drift["features"]) == len(DEFAULT_CARD.feature_names)
            scoring = (await http.get("/scoring")).json()
            assert scoring["policy"]["min_interval_s"] == 0.5
        # every vector's predictions reached the bus: nothing dropped by the changes
        assert model.consumer_metrics.counts()["invalid"] == 0


#: the bearer token of the model service's mutating routes
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def serving_api(model: ModelService) -> AsyncIterator[httpx.AsyncClient]:
    """``model`` run embedded on the replay clock, and a client of its HTTP API."""
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            yield http


async def load_candidate(http: httpx.AsyncClient, path) -> None:
    body = {"model_id": "candidate", "path": str(path)}
    assert (await http.post("/models", json=body, headers=AUTH)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "named"),
    [
        ("POST", "/models", {"model_id": "x", "path": "."}, 409, "Is a directory"),
        (
            "POST",
            "/models",
            {"model_id": "x", "path": "/nonexistent/m.onnx"},
            404,
            "model 'x': cannot read /nonexistent/m.onnx: No such file or directory",
        ),
        ("POST", "/models", {"model_id": "x", "path": ""}, 422, "'path' must be non-empty"),
        ("POST", "/models", {"model_id": "x", "path": "a\x00b"}, 422, "without NUL"),
        ("POST", "/models", {"model_id": "", "path": "m.onnx"}, 422, "'model_id'"),
        # a misspelt weight would leave the arm at weight 1
        (
            "PUT",
            "/arms",
            {"arms": [{"name": "a", "model_id": "entry", "wieght": 0.5}]},
            422,
            "arms[0]: no field named wieght",
        ),
        # nothing to change: the revision would move alone
        ("PUT", "/arms/weights", {"weights": {}}, 422, "no arm's weight given"),
        # a table that cannot route is a bad request, as its weights are
        (
            "PUT",
            "/arms",
            {"arms": [{"name": "a", "model_id": "entry", "weight": -1.0}]},
            422,
            "weight must be finite and >= 0",
        ),
        (
            "PUT",
            "/arms",
            {"arms": [{"name": "a", "model_id": "entry"}] * 2},
            422,
            "arm names must be non-empty and distinct",
        ),
        (
            "PUT",
            "/arms",
            {"arms": [{"name": "a", "model_id": "entry", "shadow": True}]},
            422,
            "no live arm",
        ),
        ("PUT", "/arms", {"arms": []}, 422, "at least one arm"),
        (
            "PUT",
            "/arms/weights",
            {"weights": {"control": -1.0}},
            422,
            "weight must be finite and >= 0",
        ),
    ],
)
async def test_a_bad_serving_change_is_refused_naming_it_and_serving_goes_on(
    method, path, body, status, named, caplog
):
    model = model_service()
    async with serving_api(model) as http:
        before = (await http.get("/arms")).json()
        with caplog.at_level(logging.WARNING, logger="pumpflow.model"):
            refused = await http.request(method, path, json=body, headers=AUTH)
        assert refused.status_code == status, refused.text
        assert named in refused.json()["detail"] and TOKEN not in refused.text
        # the log says it too: whoever watches the service, not only who asked
        (logged,) = [r.getMessage() for r in caplog.records if named in r.getMessage()]
        assert logged.startswith(f"model: {method} {path} refused ({status}): ")
        assert (await http.get("/arms")).json() == before
        assert set(model.manager.models()) == {"entry"}
        weights = {"weights": {"control": 1.0}}
        assert (await http.put("/arms/weights", json=weights, headers=AUTH)).status_code == 200


def sample(model: ModelService, name: str, **labels: str) -> float | None:
    """A metric's value in ``model``'s registry (None: no such series)."""
    return model._registry.get_sample_value(name, labels)


FOUR_ARMS = [
    {"name": "control", "model_id": "entry", "weight": 0.4},
    {"name": "treatment", "model_id": "candidate", "weight": 0.3},
    {"name": "third", "model_id": "entry", "weight": 0.2},
    {"name": "fourth", "model_id": "entry", "weight": 0.1},
]


async def test_an_arm_removed_through_the_api_leaves_its_share_to_the_others(tmp_path, caplog):
    """Without weights the removed arm's share goes to the others in proportion to their
    weights; with weights, those are set in the same change. Logged, counted, viewed."""
    model = model_service()
    async with serving_api(model) as http:
        await load_candidate(http, other_model(tmp_path, model_id="candidate"))
        assert (await http.put("/arms", json={"arms": FOUR_ARMS}, headers=AUTH)).is_success
        assert (await http.delete("/arms/treatment")).status_code == 401
        with caplog.at_level(logging.INFO, logger="pumpflow.model"):
            removed = await http.delete("/arms/treatment", headers=AUTH)
        assert removed.status_code == 200, removed.text
        answer = removed.json()
        assert answer["revision"] == 3
        shares = {arm["name"]: arm["share"] for arm in answer["arms"]}
        assert shares == pytest.approx({"control": 4 / 7, "third": 2 / 7, "fourth": 1 / 7})
        assert (await http.get("/arms")).json()["arms"] == answer["arms"]
        (logged,) = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
        assert logged.startswith(
            "model: arm 'treatment' (model candidate) removed at serving revision 3: "
            "its tokens go to the live arms left by their hash; "
        )
        assert f"control entry {DEFAULT_CARD.version} 57%" in logged
        reweighted = await http.request(
            "DELETE", "/arms/third", json={"weights": {"fourth": 0.4}}, headers=AUTH
        )
        assert reweighted.status_code == 200, reweighted.text
        shares = {arm["name"]: arm["share"] for arm in reweighted.json()["arms"]}
        assert shares == pytest.approx({"control": 0.5, "fourth": 0.5})
        assert sample(model, "pumpflow_model_serving_changes_total", change="remove_arm") == 2
        assert sample(model, "pumpflow_model_serving_changes_total", change="arms") == 1
        assert sample(model, "pumpflow_model_serving_changes_total", change="load") == 1
        share = "pumpflow_model_arm_share"
        assert sample(model, share, arm="treatment", model_id="candidate", shadow="false") is None
        assert sample(model, share, arm="fourth", model_id="entry", shadow="false") == 0.5
        status = await model.status()
        assert status["serving"]["revision"] == 4
        assert [arm["name"] for arm in status["serving"]["arms"]] == ["control", "fourth"]


async def test_the_counters_of_known_labels_are_exported_from_0(tmp_path):
    """Prometheus' increase() does not count a series' first sample: a counter child
    made at its first increment appears already at 1, and the dashboard would read 0
    for the first change of the serving, the first vector skipped for a reason, or the
    tokens of the first arm removed, or a model's first drift. Every arm and model served
    is exported from 0 as it comes."""
    model = model_service()
    async with serving_api(model) as http:
        for change in SERVING_CHANGES:
            assert sample(model, "pumpflow_model_serving_changes_total", change=change) == 0
        for reason in SKIP_REASONS:
            assert sample(model, "pumpflow_model_vectors_skipped_total", reason=reason) == 0
        reassigned = "pumpflow_model_tokens_reassigned_total"
        assert sample(model, reassigned, arm="control") == 0
        await load_candidate(http, other_model(tmp_path, model_id="candidate"))
        assert (await http.put("/arms", json={"arms": FOUR_ARMS}, headers=AUTH)).is_success
        for arm in FOUR_ARMS:
            assert sample(model, reassigned, arm=arm["name"]) == 0, arm
        # a model's first drift, the first of every model loaded since the start
        transitions = "pumpflow_model_drift_transitions_total"
        for model_id in ("entry", "candidate"):
            for state in ("drifting", "recovered"):
                assert sample(model, transitions, model_id=model_id, state=state) == 0


async def test_a_model_no_arm_serves_is_unloaded_through_the_api(tmp_path, caplog):
    model = model_service()
    async with serving_api(model) as http:
        await load_candidate(http, other_model(tmp_path, model_id="candidate"))
        version = model.manager.card("candidate").version
        arms = [
            {"name": "control", "model_id": "entry"},
            {"name": "treatment", "model_id": "candidate", "shadow": True},
        ]
        assert (await http.put("/arms", json={"arms": arms}, headers=AUTH)).is_success
        served = await http.delete("/models/candidate", headers=AUTH)
        assert served.status_code == 409, served.text
        assert "arm treatment serves it" in served.json()["detail"]
        assert (await http.delete("/arms/treatment", headers=AUTH)).is_success
        assert (await http.delete("/models/candidate")).status_code == 401
        other = await http.delete("/models/candidate", params={"version": "0" * 16}, headers=AUTH)
        assert other.status_code == 409, other.text
        assert f"serves version {version}, not {'0' * 16}" in other.json()["detail"]
        with caplog.at_level(logging.INFO, logger="pumpflow.model"):
            unloaded = await http.delete(
                "/models/candidate", params={"version": version}, headers=AUTH
            )
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["unloaded"] == {"model_id": "candidate", "version": version}
        assert unloaded.json()["revision"] == 4
        assert set((await http.get("/models")).json()["models"]) == {"entry"}
        assert (await http.get("/models/candidate/drift")).status_code == 404
        assert set(model.manager.models()) == set(model.drift) == {"entry"}
        assert [r.getMessage() for r in caplog.records if "model: unloaded" in r.getMessage()] == [
            f"model: unloaded candidate version {version} at serving revision 4 (no arm serves it)"
        ]
        serving = "pumpflow_model_serving"
        assert sample(model, serving, model_id="candidate", version=version) is None
        assert sample(model, serving, model_id="entry", version=DEFAULT_CARD.version) == 1
        assert sample(model, "pumpflow_model_serving_changes_total", change="unload") == 1
        assert (await model.status())["serving"]["models"] == {"entry": DEFAULT_CARD.version}
        # loaded again, it serves again
        await load_candidate(http, other_model(tmp_path, model_id="candidate"))
        assert set(model.manager.models()) == {"entry", "candidate"}


@pytest.mark.parametrize(
    ("path", "route", "body", "status", "named"),
    [
        ("/arms/nope", "/arms/{name}", None, 404, "no arm 'nope'"),
        ("/arms/control", "/arms/{name}", None, 409, "'control' is the last arm"),
        (
            "/arms/control",
            "/arms/{name}",
            {"weights": {"control": 2.0}},
            422,
            "the weights name 'control', the arm removed",
        ),
        ("/arms/control", "/arms/{name}", {"weights": {"nope": 2.0}}, 422, "no arm 'nope'"),
        ("/arms/control", "/arms/{name}", {"weights": {}}, 422, "no arm's weight given"),
        ("/models/entry", "/models/{model_id}", None, 409, "arm control serves it"),
        ("/models/nope", "/models/{model_id}", None, 404, "no model 'nope' is loaded"),
    ],
)
async def test_a_removal_or_unload_that_cannot_be_made_is_refused_naming_why(
    path, route, body, status, named, caplog
):
    model = model_service()
    async with serving_api(model) as http:
        before = (await http.get("/arms")).json()
        with caplog.at_level(logging.WARNING, logger="pumpflow.model"):
            refused = await http.request("DELETE", path, json=body, headers=AUTH)
        assert refused.status_code == status, refused.text
        assert named in refused.json()["detail"]
        (logged,) = [r.getMessage() for r in caplog.records if named in r.getMessage()]
        assert logged.startswith(f"model: DELETE {route} refused ({status}): ")
        assert (await http.get("/arms")).json() == before
        assert set(model.manager.models()) == {"entry"}
        assert sample(model, "pumpflow_model_serving_changes_total", change="remove_arm") in (
            None,
            0.0,
        )


async def test_removing_the_only_live_arm_is_refused_while_shadows_are_left(tmp_path):
    model = model_service()
    async with serving_api(model) as http:
        arms = [
            {"name": "control", "model_id": "entry"},
            {"name": "watch", "model_id": "entry", "shadow": True},
        ]
        assert (await http.put("/arms", json={"arms": arms}, headers=AUTH)).is_success
        refused = await http.delete("/arms/control", headers=AUTH)
        assert refused.status_code == 409, refused.text
        assert "no live arm with a positive weight" in refused.json()["detail"]
        assert [a["name"] for a in (await http.get("/arms")).json()["arms"]] == ["control", "watch"]


async def test_an_arm_change_is_logged_with_each_arms_model_version_and_share(tmp_path, caplog):
    candidate = other_model(tmp_path, model_id="candidate")
    model = model_service()
    async with serving_api(model) as http:
        await load_candidate(http, candidate)
        version = model.manager.card("candidate").version
        arms = [
            {"name": "control", "model_id": "entry", "weight": 3.0},
            {"name": "treatment", "model_id": "candidate", "weight": 1.0},
        ]
        with caplog.at_level(logging.INFO, logger="pumpflow.model"):
            assert (await http.put("/arms", json={"arms": arms}, headers=AUTH)).is_success
            reweighted = {"weights": {"treatment": 9.0}}
            assert (await http.put("/arms/weights", json=reweighted, headers=AUTH)).is_success
    routed = [r.getMessage() for r in caplog.records if "routes tokens" in r.getMessage()]
    assert routed == [
        f"model: serving revision 2 routes tokens: control entry {DEFAULT_CARD.version} 75%, "
        f"treatment candidate {version} 25%",
        f"model: serving revision 3 routes tokens: control entry {DEFAULT_CARD.version} 25%, "
        f"treatment candidate {version} 75%",
    ]


async def test_the_arms_view_names_each_arm_s_model_version(tmp_path):
    """Which model file an arm serves is its version: the model id alone survives a reload."""
    candidate = other_model(tmp_path, model_id="candidate")
    model = model_service()
    async with serving_api(model) as http:
        await load_candidate(http, candidate)
        arms = [
            {"name": "control", "model_id": "entry"},
            {"name": "treatment", "model_id": "candidate", "shadow": True},
        ]
        answer = (await http.put("/arms", json={"arms": arms}, headers=AUTH)).json()
        viewed = (await http.get("/arms")).json()
    version = model.manager.card("candidate").version
    for described in (answer, viewed):
        assert [(a["name"], a["version"]) for a in described["arms"]] == [
            ("control", DEFAULT_CARD.version),
            ("treatment", version),
        ]


async def test_a_model_of_another_feature_set_is_refused_naming_both_versions(tmp_path):
    import msgspec

    from pumpflow.common.model import read_model, write_model

    raw, card = read_model(other_model(tmp_path))
    alien = write_model(
        tmp_path / "alien.onnx",
        raw,
        msgspec.structs.replace(card, feature_set_version="0123456789abcdef"),
    )
    model = model_service()
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            answer = await http.post(
                "/models",
                json={"model_id": "alien", "path": str(alien)},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert answer.status_code == 409
        detail = answer.json()["detail"]
        assert "0123456789abcdef" in detail and DEFAULT_CARD.feature_set_version in detail
        assert set(model.manager.models()) == {"entry"}
    # and at start: the service does not start on it
    refused = model_service(model_models={"entry": str(alien)})
    with pytest.raises(ValueError, match="0123456789abcdef"):
        async with run_embedded([refused], clock=ReplayClock(START)):
            pass


def stored_serving(models: dict[str, str], *, revision: int = 7) -> bytes:
    """A serving as the replicas store it, serving ``models`` (id -> path) on one arm each."""
    from pumpflow.common.model.arms import Arm
    from pumpflow.model.service import ModelSource, Serving, _encode_serving

    return _encode_serving(
        Serving(
            revision=revision,
            models={m: ModelSource(path=p, loaded=revision) for m, p in models.items()},
            arms=tuple(Arm(name="control" if m == "entry" else m, model_id=m) for m in models),
        )
    )


async def test_settings_a_stored_serving_overrides_at_start_are_named_as_not_served(
    tmp_path, caplog
):
    """Arms or models set in the settings and a restart do not undo a change made through
    the HTTP API (the stored serving wins): the start says so, rather than serve the old
    arms silently while the settings read otherwise."""
    import json

    from pumpflow.common.state.memory import MemoryStateStore
    from pumpflow.model import DEFAULT_MODEL_PATH
    from pumpflow.model.service import SERVING_KEY

    candidate = other_model(tmp_path, model_id="candidate")
    clock = ReplayClock(START)
    store = MemoryStateStore(clock)
    await store.set(SERVING_KEY, stored_serving({"entry": str(DEFAULT_MODEL_PATH)}))
    arms = [
        {"name": "control", "model_id": "entry", "weight": 0.9},
        {"name": "candidate", "model_id": "candidate", "weight": 0.1},
    ]
    model = model_service(
        model_models={"entry": str(DEFAULT_MODEL_PATH), "candidate": str(candidate)},
        model_arms=arms,
    )
    with caplog.at_level(logging.WARNING, logger="pumpflow.model"):
        async with run_embedded([model], clock=clock, store=store):
            assert [a.name for a in model.processor.arms.arms] == ["control"]
    (warning,) = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert warning == (
        "model: the settings' models and arms are not served: the serving stored (revision "
        "7, changed through the HTTP API or by a refit) wins over them at every start; it "
        "serves models entry, arms control (entry, weight 1); the settings name models "
        "candidate, entry, arms control (entry, weight 0.9), candidate (candidate, weight 0.1) "
        "(change the serving through the HTTP API: PUT /arms, POST /models)"
    )
    assert json.loads(await store.get(SERVING_KEY))["revision"] == 7
    # the settings that are the stored serving's: nothing to say
    caplog.clear()
    again = model_service(model_models={"entry": str(DEFAULT_MODEL_PATH)})
    with caplog.at_level(logging.WARNING, logger="pumpflow.model"):
        async with run_embedded([again], clock=clock, store=store):
            pass
    assert not [r for r in caplog.records if "not served" in r.getMessage()]


def test_without_arms_each_model_is_an_arm_named_as_the_setting_says():
    """`pumpflow settings model` is where a quant reads what an unset model_arms does."""
    from pumpflow.model import DEFAULT_MODEL_PATH

    two = model_service(
        model_models={"entry": str(DEFAULT_MODEL_PATH), "twin": str(DEFAULT_MODEL_PATH)}
    )
    arms = [(a.name, a.model_id, a.weight, a.shadow) for a in two._configured_serving().arms]
    assert arms == [("entry", "entry", 1.0, False), ("twin", "twin", 1.0, False)]
    assert [a.name for a in model_service()._configured_serving().arms] == ["control"]
    described = ModelSettings.model_fields["model_arms"].description
    assert described.endswith(
        "empty: one live arm per model, named after its model id ('control' when there is "
        "one model), equal weights"
    )


def refused_model(tmp_path, refusal: str) -> tuple[str, str]:
    """A model file the live service refuses for ``refusal``, and what its refusal names."""
    from pumpflow.common.model import read_model, write_model

    raw, card = read_model(other_model(tmp_path, model_id="entry"))
    if refusal == "another feature set":
        card = msgspec.structs.replace(card, feature_set_version="0123456789abcdef")
        named = "0123456789abcdef"
    elif refusal == "expired":
        card = msgspec.structs.replace(card, created_at=START - 100.0, expires_at=START - 1.0)
        named = "expired"
    else:
        raise ValueError(refusal)
    return str(write_model(tmp_path / "refused.onnx", raw, card)), named


@pytest.mark.parametrize("refusal", ["another feature set", "expired"])
async def test_a_stored_serving_refused_at_start_serves_the_settings_models_and_says_why(
    tmp_path, caplog, refusal
):
    """Like a file missing everywhere: a replica that restarted (after an upgrade of the
    feature set, a model expired, a broken file) serves the settings' models rather than
    not start, says why, and counts it; the stored serving is left to the others."""
    from pumpflow.common.state.memory import MemoryStateStore
    from pumpflow.model.service import SERVING_KEY

    path, named = refused_model(tmp_path, refusal)
    clock = ReplayClock(START)
    store = MemoryStateStore(clock)
    stored = stored_serving({"entry": path})
    await store.set(SERVING_KEY, stored)
    model = model_service()
    with caplog.at_level(logging.ERROR, logger="pumpflow.model"):
        async with run_embedded([model], clock=clock, store=store):
            assert model.manager.card("entry").version == DEFAULT_CARD.version
            assert model.serving.revision == 7
            assert model.metrics.unavailable_count("start", "refused") == 1
            assert model.metrics.unavailable_count("start", "missing") == 0
    (error,) = [r.getMessage() for r in caplog.records if "revision 7" in r.getMessage()]
    assert named in error and "settings' models" in error
    assert await store.get(SERVING_KEY) == stored


async def test_a_stored_serving_a_running_replica_refuses_is_not_followed_and_counted_once(
    tmp_path,
):
    from pumpflow.model.service import SERVING_KEY

    path, _ = refused_model(tmp_path, "another feature set")
    model = model_service()
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        await system.store.set(SERVING_KEY, stored_serving({"entry": path}))
        assert not await model.refresh()
        assert not await model.refresh()
        assert model.metrics.unavailable_count("follow", "refused") == 1
        assert model.metrics.unavailable_count("follow", "missing") == 0
        assert model.serving.revision == 0
        assert model.manager.card("entry").version == DEFAULT_CARD.version


async def test_a_start_whose_stored_serving_and_settings_models_are_both_refused_names_both(
    tmp_path,
):
    from pumpflow.common.state.memory import MemoryStateStore
    from pumpflow.model.service import SERVING_KEY, ServingError

    path, _ = refused_model(tmp_path, "expired")
    clock = ReplayClock(START)
    store = MemoryStateStore(clock)
    await store.set(SERVING_KEY, stored_serving({"entry": path}))
    model = model_service(model_models={"entry": str(tmp_path / "absent.onnx")})
    with pytest.raises(ServingError) as refused:
        async with run_embedded([model], clock=clock, store=store):
            pass
    assert "revision 7" in str(refused.value) and "expired" in str(refused.value)
    assert "absent.onnx" in str(refused.value)


async def test_a_hot_swap_under_load_loses_no_event_and_each_prediction_names_its_version(
    tmp_path,
):
    clock = ReplayClock(START)
    vectors = FeatureUpdates().of(market(seed=7, seconds=300.0))
    swapped_in = other_model(tmp_path, model_id="entry")
    model = model_service(model_min_interval_s=0.0)
    async with run_embedded([model], clock=clock) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.prediction")
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:

            async def publish() -> None:
                for i, vector in enumerate(vectors):
                    await system.bus.publish(vector)
                    if i % 50 == 0:
                        await asyncio.sleep(0)  # let the swap in between deliveries

            feeding = asyncio.create_task(publish())
            await eventually(
                lambda: len(seen.of("model.prediction")) > 200, what="scoring under way"
            )
            answer = await http.post(
                "/models",
                json={"model_id": "entry", "path": str(swapped_in)},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert answer.status_code == 200, answer.text
            assert not feeding.done(), "the swap must land while vectors still flow"
            await feeding
        await system.drain()
        new_version = answer.json()["card"]["version"]
        assert new_version != DEFAULT_CARD.version
        predictions = seen.of("model.prediction")
        # every vector applied once: scored, or superseded by a newer one of its token
        assert model.consumer_metrics.counts()["applied"] == len(vectors)
        skipped = model.processor.skipped
        assert set(skipped) <= {"superseded"}
        assert len(predictions) + skipped["superseded"] == len(vectors)
        assert {p.causation_id for p in predictions} <= {v.id for v in vectors}
        assert len({p.causation_id for p in predictions}) == len(predictions)
        # each names its version; per token the old one until the swap, the new one after
        versions = [p.data.model_version for p in predictions]
        assert set(versions) == {DEFAULT_CARD.version, new_version}
        by_mint: dict[str, list[str]] = {}
        for p in predictions:
            by_mint.setdefault(p.key, []).append(p.data.model_version)
        for mine in by_mint.values():
            assert mine == sorted(mine, key=lambda v: v == new_version)


@contextlib.asynccontextmanager
async def a_young_market(**settings):
    """Four minutes of a market from its start, a vector per token event, through the
    model service (a monitor round run at the end); yields the model, its registry, the
    drift events, the vectors and the system, still running."""
    clock = ReplayClock(START)
    vectors = FeatureUpdates().of(market(seconds=240.0))
    registry = CollectorRegistry()
    model = ModelService(
        ModelSettings.load(
            service="model", transport="memory", api_token=TOKEN, model_monitor_s=3600.0, **settings
        ),
        registry=registry,
    )
    async with run_embedded([model], clock=clock) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.drift")
        await asyncio.wait_for(replay(system, clock, vectors), 120.0)
        await model.monitor_round()
        await system.drain()
        yield model, registry, seen, vectors, system


async def test_a_fresh_market_is_not_drift_while_its_tokens_are_young_and_says_so():
    """Every token of a young market is under four minutes old, the age and what
    accumulates with it far under the default card's reference. No feature is announced
    drifting; the drift route and the gauges say the monitor is warming up, and from when
    it judges."""
    async with a_young_market() as (model, registry, seen, vectors, system):
        assert seen.of("model.drift") == []
        monitor = model.drift["entry"]
        assert monitor.observations >= monitor.thresholds.min_observations
        assert monitor.report(fresh=True).max_psi >= monitor.thresholds.alert_psi
        warming_up = {"model_id": "entry"}
        assert registry.get_sample_value("pumpflow_model_drift_warming_up", warming_up) == 1
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            report = (await http.get("/models/entry/drift")).json()
        assert report["warming_up"] is True
        assert not any(f["drifting"] for f in report["features"])
        # the warm-up from the first vector: its time, or the clock when the model took it
        # (the replay publishes ahead of the model's deliveries by seconds)
        judged_from = vectors[0].time + monitor.thresholds.warmup_s
        assert judged_from <= report["judged_from"] <= judged_from + 30.0


async def test_the_drift_thresholds_are_settings_and_a_fresh_market_is_judged_without_warm_up():
    """The same young market with ``model_drift_warmup_s=0`` and a lower alert: judged at
    once, its young features announced drifting; settings that disagree are refused by name."""
    thresholds = {
        "model_drift_warmup_s": 0.0,
        "model_drift_alert_psi": 0.2,
        "model_drift_check_every": 250,
    }
    async with a_young_market(**thresholds) as (model, registry, seen, _, _):
        monitor = model.drift["entry"]
        assert (monitor.thresholds.warmup_s, monitor.thresholds.alert_psi) == (0.0, 0.2)
        assert monitor.thresholds.check_every == 250
        warming_up = {"model_id": "entry"}
        assert registry.get_sample_value("pumpflow_model_drift_warming_up", warming_up) == 0
        drifting = {e.data.feature for e in seen.of("model.drift") if e.data.state == "drifting"}
        assert drifting and drifting <= set(monitor.names)
    with pytest.raises(
        ValueError, match="RECOVER_PSI: Value error, must be below model_drift_alert_psi"
    ):
        ModelSettings.load(service="model", model_drift_alert_psi=0.1, model_drift_recover_psi=0.2)
    with pytest.raises(
        ValueError, match="MIN_OBSERVATIONS: Value error, must be at most model_drift_window"
    ):
        ModelSettings.load(
            service="model", model_drift_window=100, model_drift_min_observations=200
        )


async def test_a_drift_is_logged_and_viewed_naming_the_features_and_the_reference(caplog):
    """Whoever reads the log or the drift route learns what drifts, by how much, and from
    what: the card (its version) and the training rows its reference bins were taken from."""
    thresholds = {"model_drift_warmup_s": 0.0, "model_drift_alert_psi": 0.2}
    with caplog.at_level(logging.INFO, logger="pumpflow.model"):
        async with a_young_market(**thresholds) as (model, _, seen, _, system):
            app = create_app(model, system.contexts["model"])
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
                view = (await http.get("/models/entry/drift")).json()
    drifts = [e.data for e in seen.of("model.drift") if e.data.state == "drifting"]
    assert drifts
    logged = [r for r in caplog.records if " drifting: PSI " in r.getMessage()]
    reference = f"the reference bins of its card, from {DEFAULT_CARD.training.source}"
    assert [r.getMessage() for r in logged] == [
        f"model: entry version {DEFAULT_CARD.version}: feature {d.feature} drifting: PSI "
        f"{d.psi:.3f} >= {d.threshold:g} over the last {d.observations:,} vectors against "
        f"{reference}"
        for d in drifts
    ]
    assert {r.levelno for r in logged} == {logging.WARNING}
    assert view["reference"] == {
        "version": DEFAULT_CARD.version,
        "source": DEFAULT_CARD.training.source,
        "start": DEFAULT_CARD.training.start,
        "end": DEFAULT_CARD.training.end,
    }
    assert (view["thresholds"]["alert_psi"], view["thresholds"]["recover_psi"]) == (0.2, 0.1)


async def test_drift_events_a_failed_publication_left_go_out_with_the_next_round():
    clock = ReplayClock(START)
    model = model_service()
    async with run_embedded([model], clock=clock) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.drift")
        publish = system.bus.publish
        calls = itertools.count(1)

        async def second_fails(event, *args, **kwargs):
            if next(calls) == 2:
                raise ConnectionError("the broker went away")
            return await publish(event, *args, **kwargs)

        system.bus.publish = second_fails
        model._drift_out += [
            ModelDrift(model_id="entry", version="v", feature=name, state="drifting",
                       psi=0.3, threshold=0.25, observations=500)
            for name in ("age_s", "buys", "sells")
        ]  # fmt: skip
        with pytest.raises(ConnectionError):
            await model._publish_drift()
        await model._publish_drift()
        await seen.wait_for(3, "model.drift")
        assert [e.data.feature for e in seen.of("model.drift")] == ["age_s", "buys", "sells"]


def test_live_precision_is_measured_where_trading_enters(monkeypatch):
    """One setting for both services: trading's entry score is where the model's live
    precision is measured (its default, trading's, unless set)."""
    from pumpflow.common.trading import EntryFilters

    assert model_service().settings.trading_min_score == EntryFilters().min_score
    monkeypatch.setenv("PUMPFLOW_TRADING_MIN_SCORE", "0.72")
    assert model_service().settings.trading_min_score == 0.72


async def test_the_live_figures_are_measured_at_the_trading_threshold():
    from pumpflow.common.model.performance import ResolvedLabel

    model = model_service(model_store_labels=False, model_monitor_s=3600.0, trading_min_score=0.7)
    async with run_embedded([model], clock=ReplayClock(START)):
        for i, score in enumerate((0.9, 0.8, 0.65, 0.5, 0.75)):
            model.performance.add(
                ResolvedLabel(
                    mint=f"m{i}",
                    model_id="entry",
                    version=DEFAULT_CARD.version,
                    arm="control",
                    task="classification",
                    score=score,
                    time=START,
                    entry_price=1.0,
                    label=float(i != 1),
                    definition=DEFAULT_CARD.label,
                    resolved_at=START,
                )
            )
        metrics = model.performance.figures("entry", "control").metrics
    assert metrics["threshold"] == 0.7
    assert metrics["precision"] == 2 / 3  # of 0.9, 0.8 and 0.75; 0.65 and 0.5 not entered


async def test_the_live_figures_of_an_arm_taken_out_are_no_longer_exported():
    from pumpflow.common.model.performance import ResolvedLabel

    registry = CollectorRegistry()
    model = ModelService(
        ModelSettings.load(
            service="model",
            transport="memory",
            api_token=TOKEN,
            model_store_labels=False,
            model_monitor_s=3600.0,
        ),
        registry=registry,
    )

    def auc_of(arm: str) -> float | None:
        return registry.get_sample_value(
            "pumpflow_model_live_metric", {"model_id": "entry", "arm": arm, "metric": "auc"}
        )

    async with run_embedded([model], clock=ReplayClock(START)) as system:
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            arms = [
                {"name": "control", "model_id": "entry"},
                {"name": "treatment", "model_id": "entry"},
            ]
            assert (await http.put("/arms", json={"arms": arms}, headers=auth)).status_code == 200
            # labels released for both arms, the treatment's ranking badly
            for arm, good in (("control", True), ("treatment", False)):
                for i in range(400):
                    label = float(i % 2)
                    model.performance.add(
                        ResolvedLabel(
                            mint=f"m{i}",
                            model_id="entry",
                            version=DEFAULT_CARD.version,
                            arm=arm,
                            task="classification",
                            score=label if good else 1.0 - label,
                            time=START,
                            entry_price=1.0,
                            label=label,
                            definition=DEFAULT_CARD.label,
                            resolved_at=START,
                        )
                    )
            model.resolve_labels()
            assert (auc_of("control"), auc_of("treatment")) == (1.0, 0.0)
            # the treatment goes: no label comes for it any more, and an alert on its
            # last figures would fire for ever
            arms = arms[:1]
            assert (await http.put("/arms", json={"arms": arms}, headers=auth)).status_code == 200
            model.resolve_labels()
            assert (auc_of("control"), auc_of("treatment")) == (1.0, None)
            # its figures are still there to read, told apart from the arms routed now
            live = (await http.get("/models/entry/performance")).json()["live"]
            assert set(live) == {"control", "treatment"}
            assert (live["control"]["routed"], live["treatment"]["routed"]) == (True, False)


async def test_a_round_whose_shared_live_figures_fail_still_publishes_the_drift():
    """The state store refuses the shared live figures (away, or a key of theirs written
    by something else): the round's drift goes out all the same, and its labels are
    handed out; the figures are added by a later round."""
    clock = ReplayClock(START)
    model = model_service()
    async with run_embedded([model], clock=clock) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.drift")

        class Refusing:
            async def append(self, outcomes, keep):
                raise ConnectionError("the state store went away")

            async def read(self):
                raise ConnectionError("the state store went away")

        model.performance.shared = Refusing()
        model._drift_out.append(
            ModelDrift(model_id="entry", version="v", feature="buys", state="drifting",
                       psi=0.3, threshold=0.25, observations=500)
        )  # fmt: skip
        await model.monitor_round()
        await seen.wait_for(1, "model.drift")
        assert [e.data.feature for e in seen.of("model.drift")] == ["buys"]


class CountedOutcomes:
    """The shared outcomes, their reads counted."""

    def __init__(self, shared):
        self.shared = shared
        self.reads = 0

    async def append(self, outcomes, keep):
        await self.shared.append(outcomes, keep)

    async def read(self):
        self.reads += 1
        return await self.shared.read()


async def test_polling_the_live_figures_reads_the_shared_windows_once_per_live_read_s():
    """A read parses every shared window on the event loop that scores: an operator or a
    scraper polling the figures gets the last read's; fresh ones only when asked."""
    import time

    from pumpflow.common.model.performance import Outcome
    from pumpflow.model.live import StoreOutcomes

    model = model_service(
        model_store_labels=False, model_monitor_s=3600.0, model_live_read_s=3600.0
    )
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        outcomes = model.performance.shared = CountedOutcomes(model.performance.shared)
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:

            async def live(**params) -> dict:
                answer = await http.get("/models/entry/performance", params=params)
                assert answer.status_code == 200, answer.text
                return answer.json()

            first = await live()  # none read by the monitor yet: read now
            assert outcomes.reads == 1
            # another replica's labels, in the shared windows
            await StoreOutcomes(system.contexts["model"].store).append(
                {
                    ("entry", "control"): [
                        Outcome(float(i % 2), float(i % 2), "v", START, 0.5) for i in range(400)
                    ]
                },
                model.performance.window,
            )
            for _ in range(50):
                polled = await live()
            assert outcomes.reads == 1
            assert polled["live"] == first["live"] == {}
            assert 0.0 <= polled["live_read_age_s"] < 3600.0
            asked = time.monotonic()
            fresh = await live(fresh="true")
            answered = time.monotonic()
            assert outcomes.reads == 2
            assert fresh["live"]["control"]["labels"] == 400
            # the read it reports began since it was asked (its age is of that read, which
            # a loaded machine may make longer than the fifty polls took)
            assert answered - fresh["live_read_age_s"] >= asked
            # what was read stays until the next read
            assert (await live())["live"] == fresh["live"]
            assert outcomes.reads == 2
        # callers asking at once: the one waiting for the other's read, begun since they
        # asked, takes it
        asked = time.monotonic()
        await model.share_performance(since=asked)
        await model.share_performance(since=asked)
        assert outcomes.reads == 3


async def test_drift_is_announced_by_the_id_a_model_is_served_as_not_its_cards(tmp_path):
    """A retrain of ``entry`` (its card says entry) served as ``candidate`` beside it: each
    served model's drift goes out under its own id, and a reload of the candidate takes
    its own announced drift, so its recovery is announced."""
    from pumpflow.model import DEFAULT_MODEL_PATH

    retrained = other_model(tmp_path, model_id="entry")
    model = model_service(
        model_models={"entry": str(DEFAULT_MODEL_PATH), "candidate": str(retrained)},
        model_arms=[
            {"name": "control", "model_id": "entry"},
            {"name": "candidate", "model_id": "candidate", "shadow": True},
        ],
    )
    far = [vector_event("far", START, values=(1e9,) * len(DEFAULT_CARD.feature_names))] * 3_000
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.drift")
        model._observe_drift(far)
        await model._publish_drift()
        drifting = {m: model.drift[m].drifting for m in ("entry", "candidate")}
        assert drifting["entry"] and drifting["candidate"]
        expected = {(m, f) for m, features in drifting.items() for f in features}
        await seen.wait_for(len(expected), "model.drift")
        await system.drain()
        assert {(e.data.model_id, e.data.feature) for e in seen.of("model.drift")} == expected
        assert model.metrics.drift_transitions("candidate", "drifting") == len(
            drifting["candidate"]
        )
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            report = (await http.get("/models/candidate/drift")).json()
            assert report["model_id"] == "candidate"
            body = {"model_id": "candidate", "path": str(retrained)}
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert (await http.post("/models", json=body, headers=auth)).status_code == 200
        await model._restore_drift()
        assert model.drift["candidate"].drifting == drifting["candidate"]


async def test_a_vector_whose_values_do_not_match_its_names_is_dead_lettered_naming_why():
    """Refused at once, the token's stream going on, and the vectors delivered with it
    still feed the drift monitors."""
    model = model_service()
    good = [vector_event("mint", START + i, seq=i + 1) for i in range(3)]
    short = msgspec.structs.replace(good[0].data, values=good[0].data.values[:5])
    bad = msgspec.structs.replace(good[0], data=short)
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.prediction")
        model._observe_drift([bad, *good[1:]])
        assert model.drift["entry"].seen == 2
        await system.bus.publish(bad)
        await system.bus.publish(good[1])
        await seen.wait_for(1, "model.prediction")
        [letter] = await system.bus.dead_letters("model")
        assert "29 feature names but 5 values" in letter.reason
        assert "handler failed" not in letter.reason  # refused, not tried again
        assert model.consumer_metrics.counts()["invalid"] == 1
        assert not model.processor.failed


async def test_a_drift_seen_just_before_its_model_is_reloaded_is_recovered_by_the_new_monitor():
    """The transitions of a monitor replaced before the round that announces them: the
    monitor made by the reload takes the drift announced then, so it announces the
    recovery."""
    from pumpflow.model import DEFAULT_MODEL_PATH

    model = model_service()
    far = [vector_event("far", START, values=(1e9,) * len(DEFAULT_CARD.feature_names))] * 3_000
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        seen = await EventCollector("seen").attach(system.bus, "model.drift")
        model._observe_drift(far)
        drifting = model.drift["entry"].drifting
        assert drifting
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            body = {"model_id": "entry", "path": str(DEFAULT_MODEL_PATH)}
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert (await http.post("/models", json=body, headers=auth)).status_code == 200
        await model._publish_drift()
        await seen.wait_for(len(drifting), "model.drift")
        assert tuple(e.data.feature for e in seen.of("model.drift")) == drifting
        assert model.drift["entry"].drifting == drifting


async def test_the_drift_gauges_follow_the_models_served(tmp_path):
    """A hot swap's fresh monitor exports no PSI of the model it replaced (until it has
    one of its own), and a model unloaded leaves no drift series behind."""
    from pumpflow.model import DEFAULT_MODEL_PATH

    registry = CollectorRegistry()
    model = ModelService(
        ModelSettings.load(
            service="model",
            transport="memory",
            api_token=TOKEN,
            model_monitor_s=3600.0,
            model_models={
                "entry": str(DEFAULT_MODEL_PATH),
                "candidate": str(other_model(tmp_path, model_id="entry")),
            },
            model_arms=[
                {"name": "control", "model_id": "entry"},
                {"name": "candidate", "model_id": "candidate", "shadow": True},
            ],
        ),
        registry=registry,
    )
    feature = DEFAULT_CARD.feature_names[0]

    def gauge(name: str, model_id: str) -> float | None:
        return registry.get_sample_value(
            f"pumpflow_model_{name}", {"model_id": model_id, "feature": feature}
        )

    far = [vector_event("far", START, values=(1e9,) * len(DEFAULT_CARD.feature_names))] * 3_000
    async with run_embedded([model], clock=ReplayClock(START)) as system:
        model._observe_drift(far)
        await model._publish_drift()
        assert gauge("feature_psi", "entry") >= 0.25
        assert gauge("feature_drifting", "candidate") == 1
        app = create_app(model, system.contexts["model"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
            body = {"model_id": "entry", "path": str(DEFAULT_MODEL_PATH)}
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert (await http.post("/models", json=body, headers=auth)).status_code == 200
        model._unload("candidate")
        await model._publish_drift()
        assert model.drift["entry"].seen == 0
        assert gauge("feature_psi", "entry") is None
        # announced drifting: the fresh monitor takes it until its window shows a recovery
        assert gauge("feature_drifting", "entry") == 1
        assert gauge("feature_psi", "candidate") is None
        assert gauge("feature_drifting", "candidate") is None
        assert (
            registry.get_sample_value(
                "pumpflow_model_drift_window_vectors", {"model_id": "candidate"}
            )
            is None
        )


async def test_a_regression_model_the_settings_name_is_served_as_its_card_says(tmp_path):
    """The settings give a model's path only: its card says its task (pumpflow train
    --task regression tells to serve it so)."""
    path = other_model(tmp_path, model_id="ret", task="regression")
    model = model_service(
        model_models={"entry": str(DEFAULT_MODEL_PATH), "ret": str(path)},
        model_arms=[
            {"name": "control", "model_id": "entry"},
            {"name": "ret", "model_id": "ret", "shadow": True},
        ],
    )
    async with serving_api(model) as http:
        models = (await http.get("/models")).json()["models"]
        assert models["ret"]["card"]["task"] == "regression"
        assert [arm["name"] for arm in (await http.get("/arms")).json()["arms"]] == [
            "control",
            "ret",
        ]
