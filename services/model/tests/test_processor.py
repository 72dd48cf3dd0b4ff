"""ModelProcessor: the scoring policy, arms, batches scored in one call, versions named."""

from __future__ import annotations

import math

import msgspec
import pytest
from model_helpers import (
    DEFAULT_CARD,
    START,
    FakeEffects,
    lifecycle_event,
    linear_model,
    manager,
    other_model,
    vector_event,
)
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import ModelPrediction
from pumpflow.common.keyed import InvalidInput, StaleState
from pumpflow.common.model.arms import Arm, ArmTable
from pumpflow.common.model.card import vector_row
from pumpflow.common.model.manager import NonFiniteScore
from pumpflow.common.model.performance import LabelTracker
from pumpflow.common.model.processor import ModelProcessor, ScoringPolicy, ScoringState
from pumpflow.common.testing import base58_key

MINT = base58_key("scored")
ONE_ARM = ArmTable([Arm(name="control", model_id="entry")])


class Token:
    """One mint through the processor, its state stored encoded between steps."""

    def __init__(self, processor: ModelProcessor, mint: str = MINT):
        self.processor = processor
        self.mint = mint
        self.raw: bytes | None = None
        self.fx = FakeEffects(mint, START)

    def step(self, event, *, more: bool = False) -> list[ModelPrediction]:
        self.fx = FakeEffects(self.mint, event.time, more=more)
        processor = self.processor
        state = processor.initial(self.mint) if self.raw is None else processor.decode(self.raw)
        self.raw = processor.encode(processor.apply(state, event, self.fx))
        return [payload for payload, _ in self.fx.emitted]


def test_the_policy_scores_an_active_tokens_newest_vector_at_most_once_per_interval():
    processor = ModelProcessor(manager(), ONE_ARM, policy=ScoringPolicy(min_interval_s=0.5))
    token = Token(processor)
    first = token.step(vector_event(MINT, START, seq=1))
    assert [p.arm for p in first] == ["control"]
    assert token.fx.emitted[0][1] == START  # stamped with the scored vector's event time
    # inside the interval (event time): not scored; after it: scored
    assert token.step(vector_event(MINT, START + 0.3, seq=2)) == []
    assert len(token.step(vector_event(MINT, START + 0.6, seq=3))) == 1
    # a newer vector of the token follows in the same delivery: this one is superseded
    assert token.step(vector_event(MINT, START + 5.0, seq=4), more=True) == []
    assert len(token.step(vector_event(MINT, START + 5.1, seq=5))) == 1
    # another feature-set version's vector is not scored
    assert token.step(vector_event(MINT, START + 9.0, seq=6, version="other")) == []
    assert processor.skipped == {"interval": 1, "superseded": 1, "feature_set": 1}


@pytest.mark.parametrize("state", ["inactive", "graduated"])
def test_a_retired_token_is_not_scored_until_it_lives_again(state):
    processor = ModelProcessor(manager(), ONE_ARM, policy=ScoringPolicy(retire_ttl_s=600.0))
    token = Token(processor)
    assert token.step(lifecycle_event(MINT, state, START)) == []
    assert token.fx.retired == 600.0
    assert token.step(vector_event(MINT, START + 10.0)) == []
    assert token.fx.retired == 600.0  # the late vector loaded it: it goes again
    token.step(lifecycle_event(MINT, "active", START + 20.0, seq=2))
    assert len(token.step(vector_event(MINT, START + 21.0, seq=2))) == 1


def test_a_prediction_names_model_version_arm_score_and_what_it_scored():
    models = manager()
    processor = ModelProcessor(models, ONE_ARM)
    event = vector_event(MINT, START, seq=7)
    [prediction] = Token(processor).step(event)
    data = event.data
    expected = models.predict_batch(
        "entry", vector_row(data.names, data.values, DEFAULT_CARD.feature_names)[None, :]
    )[0]
    assert prediction.model_id == "entry" and prediction.arm == "control"
    assert prediction.model_version == DEFAULT_CARD.version
    assert prediction.feature_set_version == DEFAULT_CARD.feature_set_version
    assert prediction.score == pytest.approx(expected)
    assert prediction.source_seq == 7 and not prediction.shadow
    assert prediction.horizon_s == DEFAULT_CARD.label.horizon_s
    assert prediction.label == "take_profit_first"
    assert prediction.latency_s is not None and prediction.latency_s >= 0.0


def test_shadow_arms_score_beside_the_live_arm_marked_shadow(tmp_path):
    models = manager(other=other_model(tmp_path))
    arms = ArmTable(
        [
            Arm(name="control", model_id="entry"),
            Arm(name="candidate", model_id="other", shadow=True),
        ]
    )
    processor = ModelProcessor(models, arms)
    predictions = Token(processor).step(vector_event(MINT, START))
    assert [(p.arm, p.model_id, p.shadow) for p in predictions] == [
        ("control", "entry", False),
        ("candidate", "other", True),
    ]
    assert predictions[1].model_version == models.card("other").version != DEFAULT_CARD.version
    # the table is swapped at run time: the next vector follows the new one
    processor.arms = arms.promote("candidate")
    later = Token(processor, base58_key("later")).step(vector_event(base58_key("later"), START))
    assert [(p.arm, p.shadow) for p in later] == [("candidate", False), ("control", True)]


def test_a_model_that_fails_to_score_is_skipped_its_failure_counted(tmp_path):
    """onnxruntime fails on the shadow arm's model, in the batch and alone: the live arm's
    prediction goes out once and its label is followed once (the apply did not raise half
    way, which would have followed it again on the retry)."""
    models = manager(other=other_model(tmp_path))
    arms = ArmTable(
        [
            Arm(name="control", model_id="entry"),
            Arm(name="candidate", model_id="other", shadow=True),
        ]
    )

    def broken(inputs):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : the session cannot run")

    models.serving("other").session.predict = broken
    processor = ModelProcessor(models, arms, labels=LabelTracker())
    token = Token(processor)
    event = vector_event(MINT, START)
    assert processor.prepare([event], lambda mint: None) == 1
    assert [(p.arm, p.model_id) for p in token.step(event)] == [("control", "entry")]
    assert processor.failed[("other", "ModelError")] == 1
    assert len(processor.decode(token.raw).labels.items) == 1


def test_a_model_scoring_nan_publishes_no_prediction_and_its_failure_is_named(tmp_path):
    """A missing feature is NaN, which a linear model scores NaN: that score is refused as
    the model's failure (counted by its name), the vector's batch mates still scored."""
    models = manager(linear=linear_model(tmp_path))
    processor = ModelProcessor(models, ArmTable([Arm(name="control", model_id="linear")]))
    whole = vector_event(base58_key("whole"), START)
    values = list(whole.data.values)
    values[0] = math.nan
    holed = vector_event(MINT, START, values=tuple(values))
    processor.prepare([whole, holed], lambda mint: None)
    [scored] = Token(processor, whole.key).step(whole)
    assert math.isfinite(scored.score)
    assert Token(processor).step(holed) == []
    assert processor.failed == {("linear", "NonFiniteScore"): 1}
    assert processor.skipped == {"no_model": 1}
    with pytest.raises(NonFiniteScore, match="linear"):
        models.get_prediction("linear", holed.data)


def test_a_batch_of_many_tokens_is_scored_in_one_call_and_equals_scoring_alone():
    models = manager()
    processor = ModelProcessor(models, ONE_ARM)
    mints = [base58_key(f"batch{i}") for i in range(64)]
    events = [vector_event(m, START + i * 0.01, seq=i + 1) for i, m in enumerate(mints)]
    # a token's two vectors in the batch: only the newest is prepared
    events.append(vector_event(mints[0], START + 1.0, seq=99))
    held = {mints[1]: ScoringState(lifecycle="graduated")}
    before = models.get_model_performance("entry").served
    assert processor.prepare(events, held.get) == 63
    after = models.get_model_performance("entry").served
    assert (after.batches - before.batches, after.rows - before.rows) == (1, 63)
    alone = ModelProcessor(manager(), ONE_ARM)
    for event in events[2:64]:
        [batched] = Token(processor, event.key).step(event)
        [single] = Token(alone, event.key).step(event)
        assert batched.score == pytest.approx(single.score, abs=1e-6)
    # nothing was scored again for the prepared vectors
    assert models.get_model_performance("entry").served.batches == after.batches


def test_a_swap_between_prepare_and_apply_names_the_version_that_scored(tmp_path):
    clock = ReplayClock(START)
    models = manager(clock)
    processor = ModelProcessor(models, ONE_ARM)
    prepared, unprepared = vector_event(MINT, START), vector_event(base58_key("late"), START)
    processor.prepare([prepared], {}.get)
    models.load_model("entry", other_model(tmp_path, model_id="entry"), "classification")
    swapped = models.card("entry").version
    assert swapped != DEFAULT_CARD.version
    [old] = Token(processor).step(prepared)
    [new] = Token(processor, unprepared.key).step(unprepared)
    assert (old.model_version, new.model_version) == (DEFAULT_CARD.version, swapped)


def test_a_model_that_cannot_serve_makes_no_prediction_and_is_counted():
    clock = ReplayClock(START)
    processor = ModelProcessor(manager(clock), ArmTable([Arm(name="x", model_id="missing")]))
    assert Token(processor).step(vector_event(MINT, START)) == []
    assert processor.failed == {("missing", "UnknownModel"): 1}
    assert processor.skipped == {"no_model": 1}


@pytest.mark.parametrize("kept", [slice(1, None), slice(0, 0)], ids=["one short", "empty"])
def test_a_vector_whose_values_do_not_match_its_names_is_refused_touching_nothing(kept):
    """Refused at once (dead-lettered naming why), not taken as a model's failure with its
    values misread: the first of a vector one value short is not its price."""
    processor = ModelProcessor(manager(), ONE_ARM, labels=LabelTracker())
    token = Token(processor)
    assert len(token.step(vector_event(MINT, START, seq=1))) == 1
    good = vector_event(MINT, START + 1.0, seq=2)
    short = msgspec.structs.replace(good.data, values=good.data.values[kept])
    stored = token.raw
    state = processor.decode(stored)
    with pytest.raises(InvalidInput, match=f"29 feature names but {len(short.values)} values"):
        processor.apply(
            state, msgspec.structs.replace(good, data=short), FakeEffects(MINT, good.time)
        )
    assert processor.encode(state) == stored
    assert not processor.failed and not processor.skipped


def test_state_round_trips_and_unreadable_state_is_stale():
    processor = ModelProcessor(manager(), ONE_ARM)
    state = ScoringState(lifecycle="active", last_scored=START, scored=3, last_labelled=START)
    assert processor.decode(processor.encode(state)) == state
    assert len(processor.encode(state)) < 34
    kept = msgspec.structs.replace(state, arm="control")
    assert processor.decode(processor.encode(kept)) == kept
    with pytest.raises(StaleState):
        processor.decode(b"\xc1")


def test_a_state_stored_before_tokens_kept_their_arm_reads_as_placed_by_no_arm():
    """States stored by a version that kept no arm (restored after an upgrade): the token
    is placed by the shares at its next vector, then kept there."""

    class Before(msgspec.Struct, kw_only=True, array_like=True, omit_defaults=True):
        lifecycle: str | None = None
        last_scored: float = 0.0
        scored: int = 0
        last_labelled: float = 0.0
        labels: None = None
        lag: int = 3

    processor = ModelProcessor(manager(), ONE_ARM)
    raw = msgspec.msgpack.encode(Before(lifecycle="active", last_scored=START, scored=2))
    restored = processor.decode(raw)
    assert (restored.arm, restored.scored, restored.lag) == (None, 2, 3)


class Tokens:
    """Many mints through one processor, their states stored encoded between steps, each
    delivery prepared in one batch (as the keyed consumer does) or scored alone."""

    def __init__(self, processor: ModelProcessor, names: list[str]):
        self.processor = processor
        self.tokens = {base58_key(name): Token(processor, base58_key(name)) for name in names}
        self.seq = 0

    def held(self, mint: str) -> ScoringState | None:
        token = self.tokens.get(mint)
        return None if token is None or token.raw is None else self.processor.decode(token.raw)

    def live_arms(self, at: float, *, prepare: bool) -> dict[str, str]:
        """Each token's live arm for a vector at ``at``."""
        self.seq += 1
        events = [vector_event(mint, at, seq=self.seq) for mint in self.tokens]
        if prepare:
            assert self.processor.prepare(events, self.held) >= len(events)
        found = {}
        for event in events:
            [live] = [p for p in self.tokens[event.key].step(event) if not p.shadow]
            found[event.key] = live.arm
        self.processor.settle(events)
        return found


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "alone"])
def test_a_token_keeps_the_arm_that_scored_it_when_the_shares_change(tmp_path, prepare):
    """An A/B comparison reads each token's predictions as one arm's: a share change
    places new tokens only. Those scored already stay with their arm, through their state
    stored and read back, its weight at 0 included (closed to new tokens)."""
    models = manager(other=other_model(tmp_path))
    arms = ArmTable(
        [Arm(name="a", model_id="entry", weight=0.5), Arm(name="b", model_id="other", weight=0.5)]
    )
    processor = ModelProcessor(models, arms)
    old = Tokens(processor, [f"kept{i}" for i in range(60)])
    first = old.live_arms(START, prepare=prepare)
    assert set(first.values()) == {"a", "b"}
    processor.arms = moved_cut = arms.with_weights({"a": 0.1, "b": 0.9})
    assert any(moved_cut.live_arm(m).name != arm for m, arm in first.items())
    batches = [models.get_model_performance(m).served.batches for m in ("entry", "other")]
    assert old.live_arms(START + 1.0, prepare=prepare) == first
    if prepare:  # the batch was routed as the tokens' steps are: nothing scored alone
        assert [models.get_model_performance(m).served.batches for m in ("entry", "other")] == [
            b + 1 for b in batches
        ]
    new = Tokens(processor, [f"fresh{i}" for i in range(60)])
    assert new.live_arms(START + 1.0, prepare=prepare) == {
        mint: moved_cut.live_arm(mint).name for mint in new.tokens
    }
    processor.arms = moved_cut.with_weights({"a": 0.0})
    assert old.live_arms(START + 2.0, prepare=prepare) == first
    newer = Tokens(processor, [f"newer{i}" for i in range(30)])
    assert set(newer.live_arms(START + 2.0, prepare=prepare).values()) == {"b"}
    assert not processor.reassigned


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "alone"])
def test_the_tokens_of_an_arm_removed_go_to_the_arms_left_by_their_hash_and_stay(tmp_path, prepare):
    arms = ArmTable(
        [
            Arm(name="a", model_id="entry"),
            Arm(name="b", model_id="other"),
            Arm(name="c", model_id="entry"),
        ]
    )
    processor = ModelProcessor(manager(other=other_model(tmp_path)), arms)
    tokens = Tokens(processor, [f"orphan{i}" for i in range(90)])
    first = tokens.live_arms(START, prepare=prepare)
    orphans = {mint for mint, arm in first.items() if arm == "b"}
    assert orphans
    processor.arms = left = arms.without_arm("b")
    after = tokens.live_arms(START + 1.0, prepare=prepare)
    assert {mint: arm for mint, arm in after.items() if mint not in orphans} == {
        mint: arm for mint, arm in first.items() if mint not in orphans
    }
    # placed as the shares left place them: the same in every replica
    assert {mint: after[mint] for mint in orphans} == {
        mint: left.live_arm(mint).name for mint in orphans
    }
    assert {after[mint] for mint in orphans} == {"a", "c"}
    assert processor.reassigned == {"b": len(orphans)}
    # and kept there: the arm added back takes new tokens, not its old ones
    processor.arms = left.with_arm(Arm(name="b", model_id="other", weight=100.0))
    assert tokens.live_arms(START + 2.0, prepare=prepare) == after
    assert processor.reassigned == {"b": len(orphans)}


def test_a_tokens_predictions_are_followed_to_labels_at_most_once_per_label_interval():
    labels = LabelTracker(clock=ReplayClock(START))
    processor = ModelProcessor(
        manager(),
        ONE_ARM,
        policy=ScoringPolicy(min_interval_s=0.5, label_interval_s=5.0),
        labels=labels,
    )
    token = Token(processor)
    pending = []
    for at in (0.0, 1.0, 4.9, 6.0):
        # the same vector (a positive price) each time; every one is predicted
        assert token.step(vector_event(MINT, START + at, seq=1))
        pending.append(labels.pending)
    assert pending == [1, 1, 1, 2]


@pytest.mark.parametrize("lag", [30.0, 600.0])
def test_a_backlog_of_a_tokens_prices_labels_its_predictions_as_delivered_live(lag):
    from pumpflow.common.features import FeatureManager

    names = FeatureManager().names

    def vector(at: float, price: float, seq: int):
        values = [0.0] * len(names)
        values[names.index("price")] = price
        return vector_event(MINT, START + at, seq=seq, values=tuple(values))

    # scored at 1.0 every 10 s; the price reaches the take profit of the first ones 100 s
    # on, within their 120 s horizon, and falls back after it
    path = [(10.0 * i, 1.0) for i in range(10)] + [(100.0, 1.3), (130.0, 0.9)]

    def labels_with(delay: float) -> list[tuple[float, float]]:
        labels = LabelTracker(clock=ReplayClock(START))
        processor = ModelProcessor(manager(), ONE_ARM, labels=labels)
        state = processor.initial(MINT)
        timer = None
        for seq, (at, price) in enumerate(path, 1):
            now = START + at + delay
            # the token's timer fires on the clock, between its deliveries
            while timer is not None and timer <= now:
                effects = FakeEffects(MINT, timer)
                effects.timer = timer
                state = processor.fire(state, effects)
                timer = effects.timer if effects.timer != timer else None
            effects = FakeEffects(MINT, now)
            effects.timer = timer
            state = processor.apply(state, vector(at, price, seq), effects)
            timer = effects.timer
        # then the token goes quiet: its timer releases the rest
        while state.labels is not None:
            effects = FakeEffects(MINT, max(timer, effects.now))
            state = processor.fire(state, effects)
            timer = effects.timer
        return [(label.time - START, label.label) for label in labels.resolve_due(math.inf)]

    live = labels_with(0.0)
    assert live[0] == (0.0, 1.0)
    assert labels_with(lag) == live


def test_predictions_of_an_arm_share_nothing_of_another_tokens_or_versions(tmp_path):
    """Each prediction is its arm's and card's, with its own vector's fields, across
    tokens, a table swapped and a model swapped (what an arm's predictions share is
    kept between them)."""
    models = manager(other=other_model(tmp_path))
    arms = ArmTable(
        [
            Arm(name="control", model_id="entry"),
            Arm(name="candidate", model_id="other", shadow=True),
        ]
    )
    processor = ModelProcessor(models, arms)

    def expected(mint, event, prediction, arm):
        card = models.card(arm.model_id)
        return ModelPrediction(
            mint=mint,
            model_id=arm.model_id,
            arm=arm.name,
            feature_set_version=event.data.feature_set_version,
            score=prediction.score,
            horizon_s=card.label.horizon_s,
            label=card.label.kind,
            model_version=card.version,
            shadow=arm.shadow,
            latency_s=prediction.latency_s,
            source_seq=event.data.source_seq,
        )

    seen = 0
    for step, name in enumerate(("a", "b", "c", "d")):
        if step == 2:
            processor.arms = arms = arms.promote("candidate")
        if step == 3:
            models.load_model("other", other_model(tmp_path, seed=5), "classification")
        mint = base58_key(name)
        event = vector_event(mint, START + step, seq=11 + step)
        predictions = Token(processor, mint).step(event)
        assert predictions == [
            expected(mint, event, p, arm)
            for p, arm in zip(predictions, arms.route(mint), strict=True)
        ]
        seen += len(predictions)
    assert seen == 8


def test_a_promotion_moves_the_tokens_already_placed(tmp_path):
    """A promotion makes one arm live for every token, those other arms scored included
    (they go on scoring them as shadows): the tokens scored under the old table follow
    the new one from their next vector, prepared or scored alone."""
    arms = ArmTable([Arm(name="a", model_id="entry"), Arm(name="b", model_id="other")])
    processor = ModelProcessor(manager(other=other_model(tmp_path)), arms)
    tokens = [Token(processor, base58_key(f"placed{i}")) for i in range(40)]

    def live_arms(at: float, *, prepare: bool) -> list[tuple[str, bool]]:
        events = [vector_event(t.mint, at, seq=i + 1) for i, t in enumerate(tokens)]
        if prepare:
            processor.prepare(events, lambda mint: None)
        return [(p.arm, p.shadow) for t, e in zip(tokens, events, strict=True) for p in t.step(e)]

    before = live_arms(START, prepare=True)
    assert {arm for arm, _ in before} == {"a", "b"}  # both arms hold some of them
    processor.arms = arms.promote("b")
    assert live_arms(START + 10.0, prepare=True) == [("b", False), ("a", True)] * 40
    processor.arms = processor.arms.with_weights({"a": 1.0}).promote("a")
    assert live_arms(START + 20.0, prepare=False) == [("a", False), ("b", True)] * 40


def test_what_the_processor_holds_per_mint_levels_off_as_tokens_come_and_go(monkeypatch):
    """Tokens launch, are scored and retire: the mints' routes kept (ArmTable.routes)
    stay within their bound, and nothing prepared or kept per arm outlives its tokens."""
    import pumpflow.common.model.arms as arms_module

    monkeypatch.setattr(arms_module, "PLACED_KEPT", 64)
    processor = ModelProcessor(manager(), ArmTable([Arm(name="control", model_id="entry")]))
    held = []
    for wave in range(10):
        tokens = [Token(processor, base58_key(f"churn{wave}.{i}")) for i in range(50)]
        events = [vector_event(t.mint, START + wave, seq=i + 1) for i, t in enumerate(tokens)]
        processor.prepare(events, lambda mint: None)
        for token, event in zip(tokens, events, strict=True):
            assert len(token.step(event)) == 1
            token.step(lifecycle_event(token.mint, "graduated", START + wave + 0.5))
        processor.settle(events)
        held.append((len(processor.arms.routes), len(processor._prepared), len(processor._made_by)))
    assert all(
        routes <= 64 and prepared == 0 and made_by == 1 for routes, prepared, made_by in held
    )


def test_a_batch_scored_by_a_live_and_a_shadow_model_equals_scoring_each_alone(tmp_path):
    """Every token routed alike to two models: each vector's prepared entry holds both
    scores (and, labels followed, its vector), as each scores it alone."""
    other = other_model(tmp_path)
    arms = ArmTable(
        [
            Arm(name="control", model_id="entry"),
            Arm(name="candidate", model_id="other", shadow=True),
        ]
    )
    models = manager(other=other)
    processor = ModelProcessor(models, arms, labels=LabelTracker())
    mints = [base58_key(f"shadowed{i}") for i in range(16)]
    events = [vector_event(m, START + i * 0.01, seq=i + 1) for i, m in enumerate(mints)]
    assert processor.prepare(events, {}.get) == 2 * len(events)
    for event in events:
        entry = processor._prepared[event.id]
        assert entry[0] is not None and entry[1::2] == ("entry", "other")
    alone = ModelProcessor(manager(other=other), arms, labels=LabelTracker())
    for event in events:
        batched = Token(processor, event.key).step(event)
        single = Token(alone, event.key).step(event)
        assert [(p.arm, p.model_version) for p in batched] == [
            (p.arm, p.model_version) for p in single
        ]
        assert [p.score for p in batched] == pytest.approx([p.score for p in single], abs=1e-6)
    # nothing was scored again for the prepared vectors
    assert [models.get_model_performance(m).served.batches for m in ("entry", "other")] == [1, 1]
