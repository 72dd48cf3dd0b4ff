"""The fault suite's ledger tells a lost, doubled or reordered event from a clean run."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest

from pumpflow.common.consumer.keyed import Record
from pumpflow.common.events import ModelPrediction, make_event
from pumpflow.common.model.processor import ScoringState
from pumpflow.common.testing.faults import (
    BusTap,
    Ledger,
    Pipeline,
    PredictionTap,
    Servers,
    _behind,
    _consumer_counts,
    _features_short,
    _prediction_counts,
    read_sent_log,
)
from pumpflow.common.testing.stack import ProcessStack


async def test_the_tap_counts_copies_and_events_carried_after_a_later_one():
    tap = BusTap()
    for key, seq in (("a", 1), ("a", 3), ("b", 1), ("a", 2), ("a", 3), ("b", 2)):
        tap.deliveries.append((key, seq))
    assert tap.summary() == {"carried": 5, "copies": 1, "reordered": 1}


def test_the_sent_log_gives_good_frames_once_copies_and_hostile_classes(tmp_path):
    log = tmp_path / "sent.tsv"
    log.write_text(
        "1\tframe\tcreate\tm1\ts1\n"
        "1\tduplicate\tbuy\tm1\ts2\n"
        "1\tframe\tbuy\tm1\ts2\n"
        "1\thostile_deep_nesting\t-\t-\thostile1\n"
        "2\tmalformed_truncated\tsell\tm1\ts3\n"
        "2\tframe\tsell\tm1"  # the last line of a simulator killed mid-write
    )
    sent, copies, hostile = read_sent_log(log)
    assert sent == {("create", "s1"), ("buy", "s2")}
    assert copies == 1
    assert hostile == Counter(deep_nesting=1)


def test_losses_are_problems_unless_the_fault_cut_the_socket_and_the_feed_said_so():
    clean = Ledger(bus={"carried": 3}, published=3)
    assert clean.problems() == []
    lost = Ledger(lost=2, lost_sample=["s1", "s2"], bus={"carried": 3}, published=3)
    assert "2 good frames sent and never stored" in lost.problems()[0]
    assert "lost silently" in lost.problems(may_lose=True)[0]
    lost.feed_reported = {"reconnects": 1.0}
    assert lost.problems(may_lose=True) == []
    # a feed that let go of the socket with no fault of the socket's lost the market
    away = Ledger(bus={"carried": 3}, published=3, simulator={"unconnected": 40})
    assert away.problems() == ["the feed let go of the socket while the market sent 40 frames"]


def _record(*, applied: dict[str, int], published: int = 0) -> Record:
    return Record(state=b"", applied=applied, published=published)


def test_consumer_counts_find_events_lost_and_applied_twice():
    # mint a: 3 foldable events, features folded 4 (one twice) and published 4, activity
    # took 4; mint b: 2 events, features folded 1 and stopped at seq 1
    state = {
        "stored": {
            "a": [(1, "token.created", True), (2, "token.trade", True), (3, "token.trade", True)],
            "b": [(1, "token.created", True), (2, "token.trade", True)],
        },
        "records": {
            "features": {
                "a": _record(applied={"feed": 3}, published=4),
                "b": _record(applied={"feed": 1}, published=1),
            },
            "activity": {"a": _record(applied={"features": 4}), "b": _record(applied={})},
        },
        "features_events": {"a": 4, "b": 1},
    }
    assert _behind(state) == ["b: features applied feed seq 1 of 2"]
    metrics = {
        "activity": {
            'pumpflow_consumer_events_total{outcome="applied",service="activity"}': 4.0,
        }
    }
    counts = _consumer_counts(state, metrics, killed=Counter())
    assert counts["features"]["twice"] == 1
    assert counts["features"]["lost"] == 1
    # activity never saw b's one update: lost by its record and by its counter
    assert counts["activity"]["lost"] == 1
    assert counts["activity"]["twice"] == 0
    # the short mint comes with its record's bookkeeping, to tell a loss from a miscount
    short = _features_short(state)
    assert [(s["mint"], s["stored"], s["folded"]) for s in short] == [("b", 2, 1)]
    assert short[0]["record"]["applied"] == {"feed": 1}
    ledger = Ledger(bus={"carried": 5}, published=5, features_short=short)
    ledger.consumers = counts
    assert "'mint': 'b'" in next(p for p in ledger.problems() if p.startswith("features"))


def _prediction(mint: str, seq: int, cause: str, time: float, *, arm: str = "control", id=None):
    payload = ModelPrediction(
        mint=mint, model_id="entry", arm=arm, feature_set_version="v", score=0.5
    )
    return make_event(
        payload, source="model/x", time=time, seq=seq, causation_id=cause, event_id=id
    )


def _scoring(scored: int) -> bytes:
    return msgspec.msgpack.encode(ScoringState(scored=scored, last_scored=1.0))


async def test_prediction_counts_hold_each_vector_scored_to_one_prediction_carried_in_order():
    tap = PredictionTap()
    deliveries = [
        # a: 3 scored, predicted 1..3 (2 carried again: its outbox published again)
        _prediction("a", 1, "va1", 10.0, id="pa1"),
        _prediction("a", 2, "va2", 11.0, id="pa2"),
        _prediction("a", 2, "va2", 11.0, id="pa2"),
        _prediction("a", 3, "va3", 12.0, id="pa3"),
        # b: 2 scored, the second made twice under another id and seq, 0.1 s apart
        _prediction("b", 1, "vb1", 10.0, id="pb1"),
        _prediction("b", 2, "vb2", 10.1, id="pb2"),
        _prediction("b", 3, "vb2", 10.1, id="pb3"),
        # c: 3 scored and published (its record's last seq 3), only 1 and 3 carried,
        # 3 before 1
        _prediction("c", 3, "vc3", 14.0, id="pc3"),
        _prediction("c", 1, "vc1", 10.0, id="pc1"),
    ]
    for event in deliveries:
        await tap(event)
    scored = {"a": 3, "b": 2, "c": 3}
    records = {
        mint: Record(state=_scoring(n), applied={"features": 9}, published=n)
        for mint, n in scored.items()
    }
    records["b"] = Record(state=_scoring(2), applied={"features": 9}, published=3)
    state = {"model_scored": scored, "records": {"model": records}}
    counts = _prediction_counts(state, tap, min_interval_s=0.5)
    assert counts == {
        "scored": 8,
        "predicted": 7,
        "carried": 8,
        "copies": 1,
        # c's second vector, never carried: by the count and by its seq
        "lost": 1,
        "uncarried": 1,
        # b: a second id for vb2, under a second seq
        "twice": 1,
        "reordered": 1,
        "too_soon": 1,
    }
    problems = Ledger(bus={"carried": 0}, predictions=counts).problems()
    assert any("scored 1 vectors it published no prediction of" in p for p in problems)
    assert any("1 predictions published twice" in p for p in problems)
    assert any("carried after a later one" in p for p in problems)
    assert any("within the scoring interval" in p for p in problems)
    # a clean run: every vector scored carried once, copies of one id aside
    clean = PredictionTap()
    for event in deliveries[:4]:
        await clean(event)
    state = {"model_scored": {"a": 3}, "records": {"model": {"a": records["a"]}}}
    counts = _prediction_counts(state, clean, min_interval_s=0.5)
    assert (counts["scored"], counts["predicted"], counts["copies"]) == (3, 3, 1)
    assert Ledger(bus={"carried": 0}, predictions=counts).problems() == []


async def test_predictions_made_by_no_vector_the_states_count_are_twice():
    # a vector scored before a crash and published though its state was never stored,
    # then the next one scored after it: two vectors carried, one scored by the state
    tap = PredictionTap()
    await tap(_prediction("a", 1, "va1", 10.0))
    await tap(_prediction("a", 2, "va2", 11.0))
    record = Record(state=_scoring(1), applied={"features": 2}, published=1)
    state = {"model_scored": {"a": 1}, "records": {"model": {"a": record}}}
    assert _prediction_counts(state, tap, min_interval_s=0.5)["twice"] == 1


def test_the_model_is_behind_and_has_lost_until_it_applied_what_features_and_activity_published():
    records = {
        "features": {"a": _record(applied={"feed": 3}, published=3)},
        "activity": {"a": _record(applied={"features": 3}, published=2)},
        "model": {"a": _record(applied={"features": 2, "activity": 2})},
    }
    state = {
        "stored": {
            "a": [(1, "token.created", True), (2, "token.trade", True), (3, "token.trade", True)]
        },
        "records": records,
        "features_events": {"a": 3},
    }
    assert _behind(state) == ["a: model applied features seq 2 of 3"]
    metrics = {
        "model": {'pumpflow_consumer_events_total{outcome="applied",service="model"}': 5.0},
    }
    counts = _consumer_counts(state, metrics, killed=Counter())
    assert (counts["model"]["applied"], counts["model"]["lost"]) == (4, 1)
    assert counts["model"]["twice"] == 0
    # a killed model's counter starts again: only its records count
    assert "twice" not in _consumer_counts(state, metrics, killed=Counter(model=1))["model"]
    records["model"]["a"] = _record(applied={"features": 3, "activity": 2})
    assert _behind(state) == []


def test_a_pipeline_runs_the_model_only_when_asked(tmp_path):
    servers = Servers(amqp_url="amqp://x", redis_url="redis://x", postgres_dsn="postgresql://x")
    stack = ProcessStack({}, tmp_path)
    plain = Pipeline(stack, servers=servers, namespace="t")
    assert plain.services == ("feed", "features", "activity") and not plain.model
    assert plain.settings["consumer_groups"] == "features,activity"
    with_model = Pipeline(stack, servers=servers, namespace="t", stages=("model",))
    assert with_model.services == ("feed", "features", "activity", "model")
    assert with_model.settings["consumer_groups"] == "features,activity,model"
    assert set(with_model.ports) == set(with_model.services)
    with pytest.raises(ValueError, match="no optional stage"):
        Pipeline(stack, servers=servers, namespace="t", stages=("trading",))
