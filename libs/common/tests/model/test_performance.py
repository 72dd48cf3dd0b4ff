"""Live labels: resolved at the horizon (not before), equal to training's on the same price
path, bounded; rolling metrics equal to a direct computation on the same window."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.model.card import LabelDefinition
from pumpflow.common.model.labels import label_history, net_multiplier
from pumpflow.common.model.metrics import auc, brier, mae, precision_at, rmse
from pumpflow.common.model.performance import (
    LabelSource,
    LabelTracker,
    ReleasedLabels,
    ResolvedLabel,
    RollingPerformance,
    TokenLabels,
    breakeven_threshold,
)

TAKE = LabelDefinition(
    kind="take_profit_first", horizon_s=60.0, take_profit=0.2, stop_loss=0.1, fee_rate=0.0125
)
SHORT = LabelDefinition(
    kind="take_profit_first", horizon_s=20.0, take_profit=0.05, stop_loss=0.05, fee_rate=0.0125
)
RETURN = LabelDefinition(kind="net_return", horizon_s=45.0, fee_rate=0.0125)
KEEP = net_multiplier(0.0125)


def tracker_at(start: float = 0.0, **kwargs) -> tuple[LabelTracker, ReplayClock]:
    clock = ReplayClock(start)
    return LabelTracker(clock=clock, **kwargs), clock


def predict(
    tracker: LabelTracker,
    mint: str,
    time: float,
    price: float,
    definition: LabelDefinition = TAKE,
    model_id: str = "entry",
    arm: str = "a",
    score: float = 0.5,
) -> None:
    tracker.register(
        mint=mint,
        time=time,
        price=price,
        model_id=model_id,
        version="v1",
        arm=arm,
        score=score,
        definition=definition,
    )


def test_a_label_is_released_at_its_horizon_not_before():
    tracker, clock = tracker_at()
    tracker.observe("m", 0.0, 1.0)
    predict(tracker, "m", 0.0, 1.0)
    tracker.observe("m", 10.0, 1.3 / KEEP)  # take-profit hit: decided, not released
    for now in (10.0, 59.9, 60.0, 61.9):
        clock.set_sync(now)
        assert tracker.resolve_due() == []
    clock.set_sync(62.0)  # horizon + the 2 s grace
    (label,) = tracker.resolve_due()
    assert (label.label, label.mint, label.model_id, label.version, label.arm) == (
        1.0,
        "m",
        "entry",
        "v1",
        "a",
    )
    assert label.task == "classification" and label.resolved_at == 62.0
    assert tracker.pending == 0 and tracker.mints == 0


def test_a_price_at_the_horizon_counts_one_after_it_does_not():
    tracker, clock = tracker_at()
    predict(tracker, "at", 0.0, 1.0)
    predict(tracker, "after", 0.0, 1.0)
    tracker.observe("at", 60.0, 1.3 / KEEP)
    tracker.observe("after", 60.5, 1.3 / KEEP)
    clock.set_sync(100.0)
    got = {label.mint: label.label for label in tracker.resolve_due()}
    assert got == {"at": 1.0, "after": 0.0}


def test_only_prices_observed_after_the_prediction_count():
    tracker, clock = tracker_at()
    tracker.observe("m", 5.0, 1.0)
    predict(tracker, "m", 5.0, 1.0, definition=RETURN)
    clock.set_sync(100.0)
    (label,) = tracker.resolve_due()
    # no later price: sold at its own price, the fee both ways lost
    assert label.label == pytest.approx(KEEP - 1.0)


def random_path(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A token's trades: bursts of same-second trades, quiet gaps, a volatile price."""
    gaps = np.where(rng.random(n) < 0.2, 0.0, rng.exponential(4.0, n))
    gaps[0] = 0.0
    time = 1_000.0 + np.cumsum(gaps)
    price = 1e-7 * np.exp(np.cumsum(rng.normal(0.0, 0.04, n)))
    return time, price


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_live_labels_equal_training_labels_on_the_same_price_paths(seed):
    rng = np.random.default_rng(seed)
    paths = {f"mint{i}": random_path(rng, 300) for i in range(4)}
    # the trades of all mints interleaved by time, as the bus brings them
    trades = sorted((t, mint, i) for mint, (time, _) in paths.items() for i, t in enumerate(time))
    tracker, clock = tracker_at(900.0)
    models = {"entry": TAKE, "scalp": SHORT, "return": RETURN}
    released: list[ResolvedLabel] = []
    for t, mint, i in trades:
        clock.set_sync(t)
        released += tracker.resolve_due()
        price = paths[mint][1][i]
        tracker.observe(mint, t, price)  # a trade's price first, then its predictions
        for model_id, definition in models.items():
            predict(
                tracker, mint, t, price, definition=definition, model_id=model_id, score=float(i)
            )
    assert all(label.resolved_at >= label.time + label.definition.horizon_s for label in released)
    assert released, "some labels were released while the trades went on"
    for mint in paths:
        tracker.retire(mint)
    clock.set_sync(math.inf)
    released += tracker.resolve_due()
    assert tracker.pending == 0 and tracker.mints == 0
    got = {(label.mint, label.model_id, int(label.score)): label.label for label in released}
    assert len(got) == len(released) == len(trades) * len(models)
    for mint, (time, price) in paths.items():
        for model_id, definition in models.items():
            expected = label_history(time, price, definition, data_end=math.inf)
            live = np.array([got[(mint, model_id, i)] for i in range(len(time))])
            np.testing.assert_allclose(
                live, expected, rtol=1e-12, atol=0, err_msg=f"{mint} {model_id}"
            )
            if definition.kind == "take_profit_first":
                assert 0 < live.sum() < len(live)  # both outcomes occur


def test_a_retired_token_decides_its_labels_from_the_prices_seen():
    tracker, clock = tracker_at()
    predict(tracker, "m", 0.0, 1.0)
    predict(tracker, "m", 0.0, 1.0, definition=RETURN, model_id="return")
    tracker.observe("m", 5.0, 1.1)
    assert tracker.retire("m") == 2 and tracker.mints == 0
    tracker.observe("m", 6.0, 5.0)  # a straggler after retirement counts for no old label
    clock.set_sync(30.0)
    assert tracker.resolve_due() == []  # decided, but released only at the horizon
    clock.set_sync(1_000.0)
    got = {label.model_id: label.label for label in tracker.resolve_due()}
    assert got == {"entry": 0.0, "return": pytest.approx(1.1 * KEEP - 1.0)}


def test_a_tokens_waiting_labels_are_bounded_and_settled_mints_forgotten():
    tracker, clock = tracker_at(max_open=100)
    for i in range(150):
        predict(tracker, "m", float(i), 1.0)
    predict(tracker, "other", 0.0, 1.0)
    assert tracker.pending == 101 and tracker.dropped == 50
    clock.set_sync(10_000.0)
    released = tracker.resolve_due()
    assert [label.time for label in released if label.mint == "m"] == [
        float(i) for i in range(50, 150)
    ]
    assert tracker.mints == 0 and tracker.pending == 0


def test_a_long_lived_mint_keeps_a_horizons_worth_of_labels():
    rng = np.random.default_rng(5)
    tracker, clock = tracker_at()
    time, price = random_path(rng, 20_000)
    for t, p in zip(time, price, strict=True):
        clock.set_sync(t)
        tracker.resolve_due()
        tracker.observe("m", t, p)
        predict(tracker, "m", t, p)
        tokens = tracker._mints.get("m")
        if tokens is not None:
            # labels leave at their release: what waits is a horizon (and grace) of them
            assert all(item.time >= t - 62.25 for item in tokens.items)
    # a 60 s horizon at about 5 s per trade: the labels waiting are a horizon's worth
    assert tracker.pending < 100


def test_a_tokens_waiting_labels_resolve_the_same_after_being_stored():
    """What a token's state stores of its labels decides them as if never stored."""
    rng = np.random.default_rng(9)
    time, price = (values.tolist() for values in random_path(rng, 400))
    kept, _ = tracker_at(900.0)
    moved, _ = tracker_at(900.0)
    tokens = {"kept": TokenLabels(), "moved": TokenLabels()}
    names = ("a", "b", "c")
    released: dict[str, list[ResolvedLabel]] = {"kept": [], "moved": []}
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.Decoder(TokenLabels).decode
    for i, (t, p) in enumerate(zip(time, price, strict=True)):
        for which, tracker in (("kept", kept), ("moved", moved)):
            mine = tokens[which]
            mine.observe(t, p)
            tracker.release(mine, which, t)
            for model_id, definition in (("entry", TAKE), ("return", RETURN)):
                tracker.follow(
                    mine,
                    t,
                    p,
                    LabelSource(model_id, "v1", "a", definition),
                    float(i),
                    names,
                    (t, p, float(i)),
                )
            released[which] += tracker.resolve_due(-math.inf)
        tokens["moved"] = decode(encode(tokens["moved"]))  # stored, restored elsewhere
    for which, tracker in (("kept", kept), ("moved", moved)):
        tokens[which].retire()
        tracker.release(tokens[which], which, math.inf)
        released[which] += tracker.resolve_due(-math.inf)
    assert len(released["kept"]) == 2 * len(time)
    assert [msgspec.structs.replace(label, mint="kept") for label in released["moved"]] == (
        released["kept"]
    )
    assert released["kept"][0].feature_names == names
    assert released["kept"][0].vector().tolist() == [time[0], price[0], 0.0]


# -- rolling performance ----------------------------------------------------------------


def resolved(
    model_id: str,
    arm: str,
    score: float,
    label: float,
    *,
    definition: LabelDefinition = TAKE,
    version: str = "v1",
) -> ResolvedLabel:
    return ResolvedLabel(
        mint="m",
        model_id=model_id,
        version=version,
        arm=arm,
        task="classification" if definition.kind == "take_profit_first" else "regression",
        score=score,
        time=0.0,
        entry_price=1.0,
        label=label,
        definition=definition,
        resolved_at=1.0,
    )


def test_rolling_auc_precision_and_brier_equal_a_direct_computation_on_the_window():
    rng = np.random.default_rng(11)
    performance = RollingPerformance(window=500)
    scores = rng.random(1_700)
    labels = (rng.random(1_700) < scores * 0.6).astype(float)
    for i, (score, label) in enumerate(zip(scores, labels, strict=True)):
        performance.add(resolved("entry", "a", score, label, version=f"v{i // 1000}"))
        performance.add(resolved("entry", "b", 1.0 - score, label))
    window_labels, window_scores = labels[-500:], scores[-500:]
    figures = performance.figures("entry", "a")
    threshold = breakeven_threshold(TAKE)
    assert threshold == pytest.approx(1 / 3)
    assert figures.labels == 500 and figures.versions == ("v1",)
    assert figures.metrics["auc"] == auc(window_labels, window_scores)
    assert figures.metrics["brier"] == brier(window_labels, window_scores)
    assert figures.metrics["threshold"] == threshold
    assert figures.metrics["precision"] == precision_at(window_labels, window_scores, threshold)
    assert figures.metrics["precision"] == window_labels[window_scores >= threshold].mean()
    # the other arm: the same labels scored backwards
    assert performance.figures("entry", "b").metrics["auc"] == pytest.approx(
        1.0 - figures.metrics["auc"]
    )
    assert set(performance.by_arm("entry")) == {"a", "b"}
    performance.set_threshold("entry", 0.9)
    assert performance.figures("entry", "a").metrics["precision"] == precision_at(
        window_labels, window_scores, 0.9
    )
    # the score trading enters at, for every model without a threshold of its own
    at_trading = RollingPerformance(window=500, threshold=0.6)
    for score, label in zip(scores, labels, strict=True):
        at_trading.add(resolved("entry", "a", score, label))
    figures = at_trading.figures("entry", "a")
    assert figures.metrics["threshold"] == 0.6
    assert figures.metrics["precision"] == precision_at(window_labels, window_scores, 0.6)
    with pytest.raises(ValueError, match="threshold"):
        RollingPerformance(threshold=1.5)


def test_the_newest_label_is_the_latest_resolved_whatever_order_they_are_added_in():
    """Labels of tokens in different partitions resolve each in its partition's time, so
    one added later may have resolved earlier: the window says when its newest did, as
    one filled from the stored labels does."""
    one_by_one, together = RollingPerformance(), RollingPerformance()
    labels = [
        msgspec.structs.replace(resolved("entry", "a", 0.5, 1.0), resolved_at=at)
        for at in (10.0, 30.0, 20.0)
    ]
    for label in labels:
        one_by_one.add(label)
    assert one_by_one.figures("entry", "a").last_resolved_at == 30.0
    # labels released together: the same
    tracker, _ = tracker_at(0.0)
    source = LabelSource("entry", "v1", "a", TAKE)
    held = {mint: TokenLabels() for mint in ("m1", "m2", "m3")}
    for mine in held.values():
        mine.observe(0.0, 1.0)
        tracker.follow(mine, 0.0, 1.0, source, 0.5, ("a",), (0.0,))
    for mint, at in (("m1", 1000.0), ("m2", 3000.0), ("m3", 2000.0)):
        tracker.release(held[mint], mint, at)
    together.extend(tracker.resolve_due(-math.inf))
    figures = together.figures("entry", "a")
    assert figures.labels == 3 and figures.last_resolved_at == 3000.0


def test_rolling_regression_error():
    performance = RollingPerformance(window=3)
    for score, label in [(0.1, 9.0), (0.1, 0.2), (0.0, -0.1), (0.3, 0.1)]:
        performance.add(resolved("ret", "a", score, label, definition=RETURN))
    targets, predictions = np.array([0.2, -0.1, 0.1]), np.array([0.1, 0.0, 0.3])
    metrics = performance.figures("ret", "a").metrics
    assert metrics == {"rmse": rmse(targets, predictions), "mae": mae(targets, predictions)}


def test_the_manager_reports_the_live_figures_of_its_live_source(tmp_path):
    from pumpflow.common.model.card import (
        PREPROCESSING,
        HeldOut,
        ModelCard,
        TrainingWindow,
        model_digest,
        prepare_inputs,
        reference_distribution,
    )
    from pumpflow.common.model.manager import ModelManager
    from pumpflow.common.model.registry import write_model

    class Sums:
        def open(self, model, card):
            return self

        def predict(self, inputs):
            return np.nansum(inputs, axis=1).astype(np.float64)

    class Features:
        version = "fs"
        names = ("x",)

    model = b"a model"
    card = ModelCard(
        model_id="entry",
        version=model_digest(model)[:16],
        task="classification",
        feature_set_version="fs",
        feature_names=("x",),
        preprocessing=PREPROCESSING,
        output_name="probabilities",
        label=TAKE,
        training=TrainingWindow(source="t", start=0.0, end=1.0, tokens=1, rows=2),
        held_out=HeldOut(
            source="t",
            tokens=1,
            rows=1,
            model={"auc": 0.7},
            baseline_rule="r",
            baseline={"auc": 0.6},
        ),
        reference=reference_distribution(prepare_inputs(np.array([[0.0], [1.0]])), ("x",)),
        trainer={},
        created_at=0.0,
        expires_at=100.0,
        model_sha256=model_digest(model),
    )
    path = write_model(tmp_path / "entry.onnx", model, card)
    performance = RollingPerformance(window=10)
    manager = ModelManager(
        None, Features(), clock=ReplayClock(1.0), runtime=Sums(), live_performance=performance
    )
    manager.load_model("entry", path, "classification")
    assert manager.get_model_performance("entry").live == {}
    for score, label in [(0.9, 1.0), (0.2, 0.0), (0.6, 0.0)]:
        performance.add(resolved("entry", "shadow", score, label))
    report = manager.get_model_performance("entry")
    assert report.live == {"shadow": performance.figures("entry", "shadow")}
    assert report.live["shadow"].metrics["auc"] == 1.0
    plain = ModelManager(None, Features(), clock=ReplayClock(1.0), runtime=Sums())
    assert plain.live_performance is None


def test_labels_released_together_count_in_the_windows_as_added_one_by_one():
    """The rolling windows filled from a release's numbers hold what adding each
    released label would: the same labels, scores, versions and figures."""
    rng = np.random.default_rng(5)
    tracker, clock = tracker_at(0.0)
    together = RollingPerformance(window=37)
    one_by_one = RollingPerformance(window=37)
    arms = (("entry", "a", TAKE), ("entry", "b", TAKE), ("return", "a", RETURN))
    counted = 0
    for step in range(400):
        clock.set_sync(step * 0.7)
        mint = f"m{step % 9}"
        tracker.observe(mint, clock.now(), 1.0 + rng.random())
        for model_id, arm, definition in arms:
            tracker.register(
                mint=mint,
                time=clock.now(),
                price=1.0 + rng.random(),
                model_id=model_id,
                version=f"v{step // 150}",
                arm=arm,
                score=float(rng.random()),
                definition=definition,
            )
        if step % 50 == 49:
            released = tracker.resolve_due()
            counted += len(released)
            together.extend(released)
            for label in list(released):
                one_by_one.add(label)
    assert counted > 3 * 37  # the windows turned over
    assert together.keys() == one_by_one.keys() == (("entry", "a"), ("entry", "b"), ("return", "a"))
    for key in together.keys():
        assert [a.tolist() for a in together.window_of(*key)] == [
            b.tolist() for b in one_by_one.window_of(*key)
        ]
        assert together.figures(*key) == one_by_one.figures(*key)
    assert together.threshold("entry") == one_by_one.threshold("entry")


class SharedLists:
    """Shared outcomes in a dict (the state store's lists); ``fail`` appends raise."""

    def __init__(self) -> None:
        self.lists: dict[tuple[str, str], list] = {}
        self.fail = 0

    async def append(self, outcomes, keep: int) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the store went away")
        for key, found in outcomes.items():
            self.lists[key] = (self.lists.get(key, []) + list(found))[-keep:]

    async def read(self):
        return {key: list(found) for key, found in self.lists.items()}


async def test_replicas_sharing_their_outcomes_have_the_figures_of_all_their_labels():
    rng = np.random.default_rng(8)
    tracker, clock = tracker_at(0.0)
    shared = SharedLists()
    replicas = [RollingPerformance(window=40, shared=shared) for _ in range(2)]
    alone = RollingPerformance(window=40)
    arms = (("entry", "a", TAKE), ("return", "a", RETURN))
    for step in range(300):
        clock.set_sync(step * 0.7)
        mint = f"m{step % 6}"
        tracker.observe(mint, clock.now(), 1.0 + rng.random())
        for model_id, arm, definition in arms:
            tracker.register(
                mint=mint,
                time=clock.now(),
                price=1.0 + rng.random(),
                model_id=model_id,
                version=f"v{step // 150}",
                arm=arm,
                score=float(rng.random()),
                definition=definition,
            )
        if step % 25 == 24:
            released = tracker.resolve_due()
            # the tokens of one replica's partitions, then the other's, each round
            for i, replica in enumerate(replicas):
                mine = [label for label in released if int(label.mint[1:]) % 2 == i]
                replica.extend(
                    ReleasedLabels([r for r in released.releases if int(r[0][1:]) % 2 == i])
                    if i
                    else mine
                )
                alone.extend(mine)
            if step == 99:
                shared.fail = 1
                with pytest.raises(ConnectionError):
                    await replicas[0].share()  # tried again by the next one
            for replica in replicas:
                await replica.share()
    for replica in replicas:
        await replica.share()  # each reads what the other added after its last round
    assert alone.keys() == replicas[0].keys() == replicas[1].keys()
    for key in alone.keys():
        for replica in replicas:
            assert [a.tolist() for a in replica.window_of(*key)] == [
                b.tolist() for b in alone.window_of(*key)
            ]
            assert replica.figures(*key) == alone.figures(*key)
    assert replicas[0].threshold("entry") == alone.threshold("entry")
