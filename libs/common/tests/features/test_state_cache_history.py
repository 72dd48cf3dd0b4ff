"""Checkpoints, shedding, FeatureCache and EventHistoryManager."""

from __future__ import annotations

import importlib.util
import pathlib

import msgspec
import numpy as np
import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import (
    EventHistoryManager,
    FeatureManager,
    FeatureVector,
    HistoryConfig,
)
from pumpflow.common.features.inputs import trade_input
from pumpflow.common.features.processor import FeaturesProcessor
from pumpflow.common.keyed import StaleState
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.state.feature_cache import FeatureCache

_spec = importlib.util.spec_from_file_location(
    "paths_equal", pathlib.Path(__file__).with_name("test_paths_equal.py")
)
_paths = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paths)
curve_history = _paths.curve_history


def test_restored_state_carries_on_exactly():
    events = curve_history(5, trades=400, old_frames=False)
    mint = events[0].data.mint
    straight = FeatureManager()
    for e in events:
        straight.update_feature_history(e)
    resumed = FeatureManager()
    for e in events[:250]:
        resumed.update_feature_history(e)
    raw = resumed.snapshot(mint)
    other = FeatureManager()
    other.restore(mint, raw, seq=events[249].seq)
    assert other.last_seq(mint) == 250
    for e in events[250:]:
        other.update_feature_history(e)
    assert other.generate_features(mint) == straight.generate_features(mint)


def test_shedding_an_idle_token_changes_no_later_feature():
    events = curve_history(6, trades=300, old_frames=False)
    mint = events[0].data.mint
    straight, shed = FeatureManager(), FeatureManager()
    gap_at = next(i for i in range(1, len(events)) if events[i].time - events[i - 1].time > 300)
    for i, e in enumerate(events):
        if i == gap_at:
            assert shed.shed_idle(events[i].time) == 1
            assert shed.token(mint).buf_time is None
            # Round-trip the shed state too: a checkpoint of an idle token.
            shed.restore(mint, shed.snapshot(mint), seq=e.seq - 1)
        straight.update_feature_history(e)
        shed.update_feature_history(e)
        assert np.allclose(
            straight.values(straight.token(mint)), shed.values(shed.token(mint)), rtol=0, atol=0
        )


def test_runs_of_folded_trades_settle_to_what_applying_each_gives():
    events = curve_history(7, trades=600, old_frames=False)
    mint = events[0].data.mint
    applied, folded = FeatureManager(), FeatureManager()
    rng = np.random.default_rng(7)
    i = 0
    while i < len(events):
        run = events[i : i + int(rng.integers(1, 40))]
        for e in run:
            applied.update_feature_history(e)
        state = folded.token(mint)
        for e in run[:-1]:
            if state is None:
                state = folded.update_feature_history(e)  # a new token's first trade
            else:
                state.fold(trade_input(e.data, e.time))
        folded.update_feature_history(run[-1])
        assert folded.values(folded.token(mint)) == applied.values(applied.token(mint))
        i += len(run)
    # a checkpoint of a state with trades still to settle carries on exactly
    state = folded.token(mint)
    for e in events[-5:]:
        state.fold(trade_input(e.data, e.time + 1_000.0))
        applied.update_feature_history(e.data, time=e.time + 1_000.0)
    other = FeatureManager()
    other.restore(mint, folded.snapshot(mint), seq=0)
    assert other.values(other.token(mint)) == applied.values(applied.token(mint))


def test_a_checkpoint_is_encoded_again_whenever_the_state_changed():
    events = curve_history(8, trades=80, old_frames=False)
    processor = FeaturesProcessor(FeatureManager(), retire_ttl_s=60.0)
    state = processor.initial(events[0].data.mint)
    for e in events:
        state.apply(trade_input(e.data, e.time))
        state.seq = e.seq
        raw = processor.encode(state)
        assert processor.encode(state) == raw  # nothing changed in between
        assert processor.decode(raw).snapshot() == state.snapshot()
    assert state.shed(events[-1].time + 1_000.0)
    shed = processor.decode(processor.encode(state))
    assert shed.buf_time is None
    assert shed.snapshot() == state.snapshot()


def test_a_state_of_a_layout_it_cannot_read_starts_afresh():
    processor = FeaturesProcessor(FeatureManager(), retire_ttl_s=60.0)
    unreadable = processor.encode(processor.initial("m"))[:16] + msgspec.msgpack.encode([1, "x"])
    with pytest.raises(StaleState):
        processor.decode(unreadable)


async def test_feature_cache_is_a_bounded_lru_over_the_store():
    store = MemoryStateStore(ReplayClock(0.0))
    cache = FeatureCache(store, max_entries=2)
    vectors = [
        FeatureVector(mint=f"m{i}", version="v1", seq=i, time=1.0, names=("a",), values=(i,))
        for i in range(3)
    ]
    for v in vectors:
        await cache.add(v)
    assert len(cache) == 2
    # m0 fell out of the LRU but the store still has it.
    assert await cache.get("m0") == vectors[0]
    assert await cache.get("m0", version="v2") is None
    await cache.clear()
    assert len(cache) == 0


def test_history_range_queries_and_bounds():
    clock = ReplayClock(0.0)
    history = EventHistoryManager(
        HistoryConfig(max_events_per_token=100, max_age_s=50.0), clock=clock
    )
    for i in range(150):
        history.add_event("a", f"e{i}", time=float(i))
    assert history.event_count("a") == 100
    assert history.get_events("a", 60.0, 62.0) == ["e60", "e61", "e62"]
    assert history.get_events("a", end=50.5) == [f"e{i}" for i in range(50, 51)]
    assert history.get_latest_events("a", 2) == ["e148", "e149"]
    clock.set_sync(160.0)
    assert history.prune_old_events() == 60  # drops 50..109, keeps 110..149
    assert history.get_events("a")[0] == "e110"
    history.add_event("b", "x", time=1.0)
    assert history.prune_old_events(now=200.0) == 41
    assert history.mints() == []
    history.add_event("c", "y", time=5.0)
    history.clear_token_history("c")
    assert history.get_events("c") == []


def test_history_drops_the_most_silent_token_beyond_max_tokens():
    history = EventHistoryManager(HistoryConfig(max_tokens=2))
    history.add_event("a", 1, time=1.0)
    history.add_event("b", 2, time=2.0)
    history.add_event("a", 3, time=3.0)
    history.add_event("c", 4, time=4.0)
    assert sorted(history.mints()) == ["a", "c"]


def test_history_out_of_order_times_stay_queryable():
    history = EventHistoryManager()
    for t in (1.0, 3.0, 2.0, 4.0):
        history.add_event("a", t, time=t)
    assert history.get_events("a", 3.0, 3.0) == [3.0, 2.0]


@pytest.mark.parametrize("count", [0, -1])
def test_latest_events_of_nothing(count):
    history = EventHistoryManager()
    history.add_event("a", 1, time=1.0)
    assert history.get_latest_events("a", count) == []


def idle_gaps(events) -> list[int]:
    return [i for i in range(1, len(events)) if events[i].time - events[i - 1].time > 300]


def test_frozen_idle_tokens_carry_on_exactly():
    events = curve_history(6, trades=600, old_frames=False)
    mint = events[0].data.mint
    gaps = idle_gaps(events)
    assert len(gaps) >= 3
    straight, frozen = FeatureManager(), FeatureManager()
    for i, e in enumerate(events):
        if i in gaps:
            assert frozen.shed_idle(e.time) == 1
            assert frozen.frozen == 1
            blob = frozen.snapshot(mint)
            # Every wallet as an 8-byte id: well under the 4 KB an idle token may take.
            traders = straight.token(mint).unique_traders
            assert len(blob) < 400 + 16 * traders
            assert frozen.last_seq(mint) == e.seq - 1  # reading thaws it
            assert frozen.frozen == 0
            frozen.shed_idle(e.time)
        straight.update_feature_history(e)
        frozen.update_feature_history(e)
        assert frozen.values(frozen.token(mint)) == straight.values(straight.token(mint)), i
    assert frozen.token(mint).hashed  # wallets from before the last freeze kept their ids
    assert frozen.token(mint).unique_traders == straight.token(mint).unique_traders


def test_checkpoint_of_a_thawed_token_keeps_both_kinds_of_wallet():
    events = curve_history(6, trades=600, old_frames=False)
    mint = events[0].data.mint
    gap = idle_gaps(events)[0]
    straight, manager = FeatureManager(), FeatureManager()
    for e in events[:gap]:
        straight.update_feature_history(e)
        manager.update_feature_history(e)
    manager.shed_idle(events[gap].time)
    for e in events[gap : gap + 5]:
        straight.update_feature_history(e)
        manager.update_feature_history(e)
    keys = manager.token(mint).traders
    assert any(isinstance(k, int) for k in keys) and any(isinstance(k, str) for k in keys)
    resumed = FeatureManager()
    resumed.restore(mint, manager.snapshot(mint))
    assert resumed.last_seq(mint) == events[gap + 4].seq
    for e in events[gap + 5 :]:
        straight.update_feature_history(e)
        resumed.update_feature_history(e)
    assert resumed.generate_features(mint) == straight.generate_features(mint)


def test_checkpoints_written_before_wallet_ids_still_restore():
    import msgspec

    events = curve_history(5, trades=200, old_frames=False)
    mint = events[0].data.mint
    straight = FeatureManager()
    for e in events[:100]:
        straight.update_feature_history(e)
    current = msgspec.msgpack.decode(straight.snapshot(mint))
    assert len(current) == 18
    old = msgspec.msgpack.encode(current[:14])  # the 14 fields the first version wrote
    resumed = FeatureManager()
    resumed.restore(mint, old, seq=100)
    for e in events[100:]:
        straight.update_feature_history(e)
        resumed.update_feature_history(e)
    assert resumed.generate_features(mint) == straight.generate_features(mint)


def test_a_freeze_that_would_merge_two_wallets_is_refused(monkeypatch):
    from pumpflow.common.features import state as state_module

    monkeypatch.setattr(state_module, "wallet_id", lambda wallet: 42)
    events = curve_history(6, trades=300, old_frames=False)
    mint = events[0].data.mint
    gap = idle_gaps(events)[0]
    straight, manager = FeatureManager(), FeatureManager()
    for i, e in enumerate(events):
        if i == gap:
            assert manager.shed_idle(e.time) == 1
            assert manager.frozen == 0  # kept as it was: still exact
            assert manager.token(mint).buf_time is None
        straight.update_feature_history(e)
        manager.update_feature_history(e)
    assert manager.values(manager.token(mint)) == straight.values(straight.token(mint))
