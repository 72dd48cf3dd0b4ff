"""Old refits pruned after each refit: the newest and the served ones kept, with the files
of the refitting replica; a replica on an empty disk still fetches what it serves."""

from __future__ import annotations

import shutil

import msgspec
import numpy as np
import pytest
from model_helpers import DEFAULT_CARD, START
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import FeatureManager
from pumpflow.common.model.manager import LabelledRows
from pumpflow.common.model.performance import ResolvedLabel
from pumpflow.common.model.refit import RefitPolicy
from pumpflow.common.model.registry import ModelRegistry, card_path
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.labels import MemoryLabelStore, PostgresLabelStore, StoredRefit
from pumpflow.model.pruning import MemoryRefitPruner
from pumpflow.model.service import ModelService, ModelSettings
from pumpflow.model.training import LightGBMRefitter, TrainConfig

NAMES = FeatureManager().names
RSI = NAMES.index("rsi_14")
ROWS = 2_000
KEEP = 2
SETTINGS = {
    "model_refit_keep": KEEP,
    "model_refit_every_labels": 50,
    "model_refit_min_rows": ROWS // 2,
    "model_refit_window_rows": ROWS,
    "model_refit_min_interval_s": 0.0,
    # refits are asked for by the test, one at a time
    "model_refit_check_s": 3600.0,
}


class ScriptedRefitter:
    """LightGBM's refit, or (told ``False``) one on shuffled labels: no better than
    chance, so the serving model is kept."""

    def __init__(self) -> None:
        self.lightgbm = LightGBMRefitter(config=TrainConfig(n_estimators=30))
        self.plan: list[bool] = []

    def refit(self, card, fit_on: LabelledRows, held_out: LabelledRows, *, now: float):
        if not self.plan.pop(0):
            shuffled = np.random.default_rng(len(self.plan)).permutation(fit_on.labels)
            fit_on = LabelledRows(
                rows=fit_on.rows,
                labels=shuffled,
                time=fit_on.time,
                token=fit_on.token,
                source=fit_on.source,
            )
        return self.lightgbm.refit(card, fit_on, held_out, now=now)


def labels(n: int, *, first: int, rising: bool = True) -> list[ResolvedLabel]:
    """``n`` labels of the default model from label number ``first`` on (each later than
    the one before): 1 where rsi_14 is above 0 (below, not ``rising``)."""
    rng = np.random.default_rng(first)
    rows = rng.normal(size=(n, len(NAMES)))
    above = rows[:, RSI] > 0.0
    found = []
    for i in range(n):
        time = START - 100_000.0 + (first + i) * 0.5
        found.append(
            ResolvedLabel(
                mint=f"token{(first + i) // 40}",
                model_id="entry",
                version=DEFAULT_CARD.version,
                arm="control",
                task="classification",
                score=0.5,
                time=time,
                entry_price=1.0,
                label=float(above[i] if rising else not above[i]),
                definition=DEFAULT_CARD.label,
                resolved_at=time + 122.0,
                feature_names=NAMES,
                features=tuple(float(v) for v in rows[i]),
            )
        )
    return found


async def stored_refits(pg_pool) -> list[tuple[str, bool]]:
    rows = await pg_pool.fetch(
        "SELECT candidate_version, swapped FROM model_refits WHERE model_id = 'entry' ORDER BY id"
    )
    return [(r["candidate_version"], r["swapped"]) for r in rows]


async def test_old_refits_are_pruned_but_the_newest_and_the_served_one(pg_pool, tmp_path):
    store = PostgresLabelStore(pg_pool)
    state = MemoryStateStore(ReplayClock(START))
    refitter = ScriptedRefitter()
    model = ModelService(
        ModelSettings.load(
            service="model",
            transport="memory",
            model_registry_dir=str(tmp_path / "fitter"),
            **SETTINGS,
        ),
        registry=CollectorRegistry(),
        refitter=refitter,
    )
    registry = ModelRegistry(tmp_path / "fitter")
    added = 0

    async def refit(more: list[ResolvedLabel], better: bool) -> StoredRefit:
        nonlocal added
        await store.add(more, feature_set_version=DEFAULT_CARD.feature_set_version, names=NAMES)
        added += len(more)
        refitter.plan.append(better)
        done = await model.refit_if_due("entry")
        assert done is not None and done.swapped is better
        return done

    async with run_embedded([model], clock=ReplayClock(START), db=pg_pool, store=state):
        first = await refit(labels(ROWS, first=0), True)
        kept = [await refit(labels(50, first=ROWS + 50 * k), False) for k in range(3)]
        # past the newest two, the serving one stays, and its file
        assert await stored_refits(pg_pool) == [
            (first.candidate_version, True),
            *[(r.candidate_version, False) for r in kept[1:]],
        ]
        assert registry.path("entry", first.candidate_version).exists()
        assert model.metrics.pruned_count("entry", "refit") == 1
        assert model.metrics.pruned_count("entry", "file") == 0

        # labels the serving model ranks upside down: a refit is swapped in
        last = await refit(labels(ROWS, first=ROWS * 2, rising=False), True)
        assert model.manager.card("entry").version == last.candidate_version
        assert await stored_refits(pg_pool) == [
            (kept[-1].candidate_version, False),
            (last.candidate_version, True),
        ]
        gone = registry.path("entry", first.candidate_version)
        assert not gone.exists() and not card_path(gone).exists()
        assert registry.path("entry", last.candidate_version).exists()
        assert model.metrics.pruned_count("entry", "refit") == 3
        assert model.metrics.pruned_count("entry", "file") == 1

    # a replica on another, empty disk fetches the model it serves from the database
    shutil.rmtree(tmp_path / "fitter")
    other = ModelService(
        ModelSettings.load(
            service="model",
            transport="memory",
            model_refit=False,
            model_registry_dir=str(tmp_path / "other"),
        ),
        registry=CollectorRegistry(),
    )
    async with run_embedded([other], clock=ReplayClock(START), db=pg_pool, store=state):
        assert other.manager.card("entry").version == last.candidate_version
        assert other.manager.path("entry") == ModelRegistry(tmp_path / "other").path(
            "entry", last.candidate_version
        )
        assert other.metrics.unavailable_count("start") == 0


def refit_of(version: str, sha256: str | None) -> StoredRefit:
    return StoredRefit(
        model_id="entry",
        serving_version="v0",
        candidate_version=version,
        swapped=sha256 is not None,
        metric="auc",
        serving_score=0.5,
        candidate_score=0.6,
        held_out_rows=10,
        rows=30,
        last_label_id=1,
        at=0.0,
        sha256=sha256,
    )


async def test_the_memory_store_prunes_by_the_same_policy():
    store = MemoryLabelStore()
    for refit in [
        refit_of("a", "ha"),
        refit_of("b", None),
        refit_of("c", "hc"),
        refit_of("d", None),
    ]:
        await store.record_refit(refit)
    other = msgspec.structs.replace(refit_of("x", "hx"), model_id="other")
    await store.record_refit(other)
    pruned = await MemoryRefitPruner(store).prune("entry", RefitPolicy(keep_refits=2), {"ha"})
    assert [p.candidate_version for p in pruned] == ["b"]
    assert [r.candidate_version for r in store.refits] == ["a", "c", "d", "x"]


def test_the_policy_keeps_the_newest_and_the_served():
    policy = RefitPolicy(keep_refits=2)
    assert policy.prunable(["h4", None, "h2", None, "h0"], {"h2"}) == [3, 4]
    assert policy.prunable(["h1", "h0"], set()) == []
    with pytest.raises(ValueError):
        RefitPolicy(keep_refits=0)


async def test_the_refits_of_a_model_served_under_another_id_than_its_cards_are_pruned(tmp_path):
    """A copy of ``entry`` (its card says entry) served as ``candidate``: its refits are
    written where their cards name them, and their files go when they are pruned."""
    shutil.copy(DEFAULT_MODEL_PATH, tmp_path / "copy.onnx")
    shutil.copy(card_path(DEFAULT_MODEL_PATH), card_path(tmp_path / "copy.onnx"))
    store = MemoryLabelStore()
    refitter = ScriptedRefitter()
    model = ModelService(
        ModelSettings.load(
            service="model",
            transport="memory",
            model_registry_dir=str(tmp_path / "fitter"),
            model_models={"candidate": str(tmp_path / "copy.onnx")},
            **{**SETTINGS, "model_refit_keep": 1},
        ),
        registry=CollectorRegistry(),
        refitter=refitter,
        label_store=store,
    )
    registry = ModelRegistry(tmp_path / "fitter")

    async def refit(more: list[ResolvedLabel]) -> StoredRefit:
        more = [msgspec.structs.replace(label, model_id="candidate") for label in more]
        await store.add(more, feature_set_version=DEFAULT_CARD.feature_set_version, names=NAMES)
        refitter.plan.append(True)
        done = await model.refit_if_due("candidate")
        assert done is not None and done.swapped
        return done

    async with run_embedded([model], clock=ReplayClock(START)):
        first = await refit(labels(ROWS, first=0))
        assert model.manager.card("candidate").model_id == "entry"
        written = registry.path("entry", first.candidate_version)
        assert written.exists()
        await refit(labels(ROWS, first=ROWS * 2, rising=False))
        assert first.candidate_version not in {r.candidate_version for r in store.refits}
        assert not written.exists() and not card_path(written).exists()
        assert model.metrics.pruned_count("candidate", "file") == 1
