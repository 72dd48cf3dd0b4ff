"""Refits that decide nothing are told as plainly as those that do: counted by outcome and
reason from 0, stored beside the refits decided, listed by ``GET /refits``, and waited out
like a refit decided, on every replica."""

from __future__ import annotations

import httpx
import msgspec
import numpy as np
import pytest
from model_helpers import DEFAULT_CARD, NAMES, START, linear_model, synthetic_labels
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock
from pumpflow.common.model import read_model
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.http import create_app
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.labels import MemoryLabelStore, PostgresLabelStore
from pumpflow.model.metrics import REFIT_REASONS
from pumpflow.model.service import ModelService, ModelSettings

SETTINGS = {
    # refits are asked for by the test, one at a time
    "model_refit": False,
    "model_refit_every_labels": 100,
    "model_refit_min_rows": 100,
    "model_refit_min_interval_s": 600.0,
    "model_refit_keep": 2,
}


class ServingAgain:
    """A candidate that is the serving model itself: fitted at once, never better."""

    def refit(self, card, fit_on, held_out, *, now):
        return read_model(DEFAULT_MODEL_PATH)


class Linear:
    """A candidate that scores a missing input NaN (a non-tree model)."""

    def __init__(self, folder):
        self.path = linear_model(folder)

    def refit(self, card, fit_on, held_out, *, now):
        return read_model(self.path)


class Broken:
    def refit(self, card, fit_on, held_out, *, now):
        raise RuntimeError("the refitter broke")


def alternating(rows: np.ndarray) -> np.ndarray:
    return (np.arange(len(rows)) % 2) * 1.0


def none_positive(rows: np.ndarray) -> np.ndarray:
    return np.zeros(len(rows))


def none_positive_lately(rows: np.ndarray) -> np.ndarray:
    """Both classes in the rows fitted on, one in the newest share held out."""
    labels = alternating(rows)
    labels[int(len(rows) * 0.6) :] = 0.0
    return labels


def missing_first_feature(labels):
    """The labels with their vectors' first feature missing: the trees route it, a
    linear model scores NaN."""
    return [
        msgspec.structs.replace(label, features=(float("nan"), *label.features[1:]))
        for label in labels
    ]


#: case -> refitter, labels, (outcome, reason), what the detail names
CASES = {
    "a candidate scoring held-out rows NaN": lambda folder: (
        Linear(folder),
        missing_first_feature(synthetic_labels(alternating)),
        ("refused", "non_finite_score"),
        "refit candidate of model 'entry' scored",
    ),
    "one class to fit on": lambda folder: (
        ServingAgain(),
        synthetic_labels(none_positive),
        ("refused", "one_class"),
        "one class",
    ),
    "one class held out": lambda folder: (
        ServingAgain(),
        synthetic_labels(none_positive_lately),
        ("refused", "held_out_one_class"),
        "held-out",
    ),
    # 100 labels half a second apart: none labelled before the held-out slice began
    "too few rows": lambda folder: (
        ServingAgain(),
        synthetic_labels(alternating, n=100),
        ("refused", "too_few_rows"),
        "to fit on",
    ),
    "the refitter failing": lambda folder: (
        Broken(),
        synthetic_labels(alternating),
        ("failed", "error"),
        "the refitter broke",
    ),
}


def model_service(refitter, folder, **settings) -> ModelService:
    return ModelService(
        ModelSettings.load(
            service="model",
            transport="memory",
            model_registry_dir=str(folder / "registry"),
            **{**SETTINGS, **settings},
        ),
        registry=CollectorRegistry(),
        refitter=refitter,
    )


async def store_labels(pg_pool, labels) -> None:
    await PostgresLabelStore(pg_pool).add(
        labels, feature_set_version=DEFAULT_CARD.feature_set_version, names=NAMES
    )


def refit_counts(model: ModelService, model_id: str = "entry") -> dict[tuple[str, str], float]:
    """The refit counter's series of ``model_id``, as a scrape reads them."""
    return {
        (sample.labels["outcome"], sample.labels["reason"]): sample.value
        for metric in model.metrics._f.refits.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["model_id"] == model_id
    }


async def refits_listed(model: ModelService, system, **params) -> list[dict]:
    app = create_app(model, system.contexts["model"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://model") as http:
        answer = await http.get("/refits", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()["refits"]


async def test_the_refit_counter_starts_at_zero_for_every_outcome_and_reason(tmp_path):
    model = model_service(ServingAgain(), tmp_path)
    async with run_embedded([model], clock=ReplayClock(START)):
        known = {(outcome, r) for outcome, reasons in REFIT_REASONS.items() for r in reasons}
        assert {"swapped", "kept", "refused", "failed"} == set(REFIT_REASONS)
        assert refit_counts(model) == dict.fromkeys(known, 0.0)


@pytest.mark.parametrize("case", CASES)
async def test_a_refit_that_decides_nothing_is_counted_by_reason_stored_and_listed(
    pg_pool, tmp_path, case
):
    refitter, labels, (outcome, reason), named = CASES[case](tmp_path)
    await store_labels(pg_pool, labels)
    model = model_service(refitter, tmp_path)
    async with run_embedded([model], clock=ReplayClock(START), db=pg_pool) as system:
        if outcome == "failed":
            with pytest.raises(RuntimeError, match="the refitter broke"):
                await model.refit_if_due("entry")
        else:
            refused = await model.refit_if_due("entry")
            assert (refused.outcome, refused.reason) == (outcome, reason)
        counts = refit_counts(model)
        assert counts.pop((outcome, reason)) == 1
        assert set(counts.values()) == {0.0}
        # the serving one goes on, everywhere
        assert model.manager.card("entry").version == DEFAULT_CARD.version
        assert model.serving.revision == 0
        # listed from the store every replica shares
        (attempt,) = await refits_listed(model, system)
        assert (attempt["model_id"], attempt["outcome"], attempt["reason"]) == (
            "entry",
            outcome,
            reason,
        )
        assert named in attempt["detail"]
        assert attempt["serving_version"] == DEFAULT_CARD.version
        assert attempt["rows"] == len(labels) and attempt["at"] == START
        assert attempt["candidate_version"] is None


async def test_a_refused_refit_waits_its_interval_on_every_replica_and_the_newest_are_kept(
    pg_pool, tmp_path
):
    await store_labels(pg_pool, synthetic_labels(none_positive))
    clock = ReplayClock(START)
    first = model_service(ServingAgain(), tmp_path)
    async with run_embedded([first], clock=clock, db=pg_pool):
        assert (await first.refit_if_due("entry")).reason == "one_class"
    # another replica, or this one restarted: the stored refusal says when it was tried
    second = model_service(ServingAgain(), tmp_path)
    async with run_embedded([second], clock=clock, db=pg_pool) as system:
        assert await second.refit_if_due("entry") is None
        assert second.metrics.refits("entry", "refused") == 0
        for _ in range(2):
            await clock.advance(SETTINGS["model_refit_min_interval_s"])
            assert (await second.refit_if_due("entry")).reason == "one_class"
        assert second.metrics.refits("entry", "refused", "one_class") == 2
        # the newest model_refit_keep of them, newest first
        listed = await refits_listed(second, system, model_id="entry")
        assert [a["at"] for a in listed] == [START + 1_200.0, START + 600.0]
        assert await refits_listed(second, system, model_id="other") == []
        assert len(await refits_listed(second, system, limit=1)) == 1


async def test_a_refit_whose_labels_cannot_be_read_fails_counted_as_a_dependency_away(tmp_path):
    class DatabaseGone(MemoryLabelStore):
        async def recent(self, *of_model_and_limit):
            raise ConnectionRefusedError(111, "Connect call failed")

    store = DatabaseGone()
    await store.add(
        synthetic_labels(alternating),
        feature_set_version=DEFAULT_CARD.feature_set_version,
        names=NAMES,
    )
    model = model_service(ServingAgain(), tmp_path)
    model.label_store = store
    async with run_embedded([model], clock=ReplayClock(START)):
        with pytest.raises(ConnectionRefusedError):
            await model.refit_if_due("entry")
        assert model.metrics.refits("entry", "failed", "dependency_unavailable") == 1
        (failed,) = store.undecided
        assert (failed.outcome, failed.rows) == ("failed", None)
        assert "ConnectionRefusedError" in failed.detail


async def test_a_refit_of_a_model_whose_card_expired_is_refused_as_such(tmp_path):
    store = MemoryLabelStore()
    await store.add(
        synthetic_labels(alternating),
        feature_set_version=DEFAULT_CARD.feature_set_version,
        names=NAMES,
    )
    model = model_service(ServingAgain(), tmp_path)
    model.label_store = store
    clock = ReplayClock(START)
    async with run_embedded([model], clock=clock):
        await clock.advance_to(DEFAULT_CARD.expires_at)
        refused = await model.refit_if_due("entry")
        assert (refused.outcome, refused.reason) == ("refused", "model_expired")
        assert "expired" in refused.detail and store.undecided == [refused]
        assert model.metrics.refits("entry", "refused", "model_expired") == 1
